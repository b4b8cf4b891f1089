"""``python -m bench <scenario>|all [--smoke] [--out DIR]``: run benchmarks, print tables, save JSON.

Each scenario prints its table; ``all`` also prints one table of every target check at the end.
Results go to ``<out>/<scenario>.json`` (``-smoke.json`` for smoke runs). The exit code is 0 when
every scenario ran (a missed target is reported, not an error), 1 when one crashed. The child
options (``--concurrency`` for cost, ``--phase`` for scale, ``--s3-phase`` for s3,
``--merge-manifest`` for merge) measure one part in this process and are what the scenarios use
internally to get a fresh process for peak-RSS figures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import auto, baselines, cold, cost, known, merge_scale, remembered, s3_scale, scale, shards
from bench.table import ScenarioResult, render, render_checks, save
from bench.workspace import DEFAULT_OUT, Workspace

SCENARIOS: dict[str, Callable[[Workspace], ScenarioResult]] = {
    "known": known.run, "auto": auto.run, "cold": cold.run, "remembered": remembered.run,
    "baselines": baselines.run, "cost": cost.run, "scale": scale.run, "s3": s3_scale.run, "shards": shards.run,
    "merge": merge_scale.run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--smoke", action="store_true", help="a few-second version of each scenario")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    cost.add_child_arguments(parser)
    scale.add_child_arguments(parser)
    s3_scale.add_child_arguments(parser)
    merge_scale.add_child_arguments(parser)
    return parser


def run_scenario(name: str, workspace: Workspace) -> ScenarioResult | None:
    print(f"## {name}{' (smoke)' if workspace.smoke else ''}", flush=True)
    started = time.monotonic()
    try:
        result = SCENARIOS[name](workspace)
    except Exception:  # one scenario's crash must not lose the others' results
        traceback.print_exc()
        print(f"{name}: FAILED to run", flush=True)
        return None
    path = save(result, workspace.out)
    print(render(result.columns, result.rows))
    for note in result.notes:
        print(f"note: {note}")
    print(f"({time.monotonic() - started:.0f} s; saved to {path})\n", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)  # the runner's INFO records are watched, not printed
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    workspace = Workspace(out=args.out, smoke=args.smoke)
    if args.scenario == "cost" and args.concurrency is not None:
        cost.child(args, workspace)
        return 0
    if args.scenario == "scale" and args.phase is not None:
        scale.child(args)
        return 0
    if args.scenario == "s3" and args.s3_phase is not None:
        s3_scale.child(args)
        return 0
    if args.scenario == "merge" and args.merge_manifest is not None:
        merge_scale.child(args)
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = [run_scenario(name, workspace) for name in names]
    done = [result for result in results if result is not None]
    if done:
        print("## targets\n" + render_checks(done), flush=True)
    return 0 if len(done) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
