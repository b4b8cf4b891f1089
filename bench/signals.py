"""``python -m bench.signals``: the long version of issue 9's signal test (50 signals at random instants).

Each of ``--runs`` runs of the real command (45 images against an emulator process with 0.2 s
latency) gets SIGINT or SIGTERM at a seeded random instant between 0.04 and 3 s after it starts:
start-up, manifest, scan, pool or report (the first ~15 ms are the Python interpreter starting,
before any code of ours runs: batch_upscaler/entry.py installs its handler first thing after).
Every run must end with exit 75 (checkpoint consistent, no item in progress, a report naming the
signal) or with exit 0 and every item done; never 0 with work left, never death by signal, never a
traceback. Uses tests/test_signals.py's driver.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.emulator_process import EmulatorProcess, EmulatorSpec
from tests.conftest import SMALL_OUTPUT
from tests.test_signals import signal_at_random_instants


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.signals", description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="signals-"))
    spec = EmulatorSpec(canned_output=False, output_max_pixels=SMALL_OUTPUT, latency_s=0.2)
    started = time.monotonic()
    with EmulatorProcess(spec, base / "requests.jsonl") as emulator:
        outcomes = signal_at_random_instants(base, emulator, runs=args.runs, seed=args.seed)
    print(f"{args.runs} runs, a signal at a random instant in [0.04, 3 s] each (seed {args.seed}), "
          f"{time.monotonic() - started:.0f} s")
    print(f"  stopped, exit 75, consistent, report names the signal: {outcomes['stopped']}")
    print(f"  finished before the signal, exit 0, every item done:   {outcomes['finished first']}")
    print("  any other ending (0 with work left, a signal death, a traceback): 0 (the driver asserts it)")


if __name__ == "__main__":
    main()
