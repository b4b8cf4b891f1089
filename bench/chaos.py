"""``python -m bench.chaos``: the large chaos run of issue 5 (≥ 500 images, ≥ 20 kill -9s, 20% faults).

Uses the same driver as tests/test_chaos.py (the small version in the default suite). The emulator
runs on a thread of this process; each run of the real command is a subprocess killed with
SIGKILL after a random number of further answered requests. Prints one table of what was checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from batch_upscaler.emulator import EmulatorConfig, EmulatorThread, FaultKind
from tests.chaos_driver import ChaosPlan, ChaosResult, run_chaos
from tests.conftest import SMALL_OUTPUT, manifest_doc

# 20% of requests fail; about a seventh of those may have been billed (cut-off or broken 200s).
LARGE_FAULTS = {FaultKind.THROTTLE: 0.06, FaultKind.SERVICE_UNAVAILABLE: 0.04, FaultKind.INTERNAL_ERROR: 0.03,
                FaultKind.HANGUP: 0.02, FaultKind.MODEL_NOT_READY: 0.02, FaultKind.DISCONNECT: 0.01,
                FaultKind.TRUNCATED: 0.01, FaultKind.MODEL_TIMEOUT: 0.01}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))

    def write_manifest(**overrides: Any) -> Path:
        path = tmp / "job.yaml"
        path.write_text(yaml.safe_dump(manifest_doc(**overrides)))
        return path

    config = EmulatorConfig(fault_rates=LARGE_FAULTS, seed=args.seed, latency_s=0.02, output_max_pixels=SMALL_OUTPUT)
    started = time.monotonic()
    with EmulatorThread(config) as emulator:
        plan = ChaosPlan(images=args.images, kills=args.kills, seed=args.seed, max_requests_between_kills=40)
        result = run_chaos(plan, tmp, write_manifest, emulator)
        faults = Counter(r.fault or str(r.status) for r in emulator.records() if r.fault or r.status != 200)
    report(result, faults, time.monotonic() - started, args)


def report(result: ChaosResult, faults: Counter[str], seconds: float, args: argparse.Namespace) -> None:
    per_image = list(result.requests_per_image.values())
    rows = {
        "images": args.images, "kill -9s": result.kills, "final exit code": result.final_exit,
        "succeeded": result.succeeded, "outputs identical to an emulator answer": result.outputs_match_emulator,
        "temporary files left": result.temp_files,
        "requests for images already recorded succeeded": result.resent_after_success,
        "fault responses": sum(faults.values()), "requests": sum(per_image),
        "requests per image (mean / max)": f"{statistics.fmean(per_image):.2f} / {max(per_image)}",
        "requests-per-image histogram": dict(sorted(Counter(per_image).items())),
        "faults by kind": dict(faults.most_common()), "seconds": round(seconds, 1),
    }
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
