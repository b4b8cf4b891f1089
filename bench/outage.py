"""``python -m bench.outage``: issue 10's outage scenarios at full length.

1. A 503 storm: every request answered 503 for the first ``--storm`` seconds (60 by default),
   60 images. The run must pause (the breaker opens after ``outage_errors``), probe with free
   requests at growing intervals, resume when the storm ends, and finish with every image done,
   none failed, exit 0. Printed: requests that carried an image, free probes, wall time.
2. The same storm longer than ``limits.outage_wait``: exit 75, every item pending, none failed,
   and the report's ``stopped`` says since when.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from bench.emulator_process import EmulatorProcess, EmulatorSpec
from tests.conftest import SMALL_OUTPUT, cli_env, manifest_doc, write_image


def scenario(base: Path, storm_s: float, outage_wait: str, images: int) -> dict[str, object]:
    base.mkdir(parents=True)
    for i in range(images):
        write_image(base / "photos" / f"p{i:03d}.png", 70 + i % 40, 66, color=(i % 256, 9, 9))
    flags = ("--fault-rates", '{"service_unavailable": 1.0}', "--fault-window", f"0:{storm_s}")
    spec = EmulatorSpec(canned_output=False, output_max_pixels=SMALL_OUTPUT, latency_s=0.05, extra=flags)
    with EmulatorProcess(spec, base / "requests.jsonl") as emulator:
        manifest = base / "job.yaml"
        manifest.write_text(yaml.safe_dump(manifest_doc(
            backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
            limits={"concurrency": 4, "requests_per_minute": 600, "outage_wait": outage_wait,
                    "backoff_base_s": 2, "backoff_max_s": 60})))  # the production back-off and probe intervals
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "batch_upscaler", "run", str(manifest)], env=cli_env(),
                             capture_output=True, text=True, timeout=3600)
        elapsed = time.monotonic() - started
        records = emulator.records()
    report = json.loads((base / ".batch-upscaler/reports/job/report.json").read_text())
    return {"exit": run.returncode, "seconds": round(elapsed, 1),
            "states": dict(Counter(item["status"] for item in report["items"])),
            "image requests": sum(1 for r in records if r.image_sha256),
            "free probes": sum(1 for r in records if not r.image_sha256),
            "stopped": report["stopped"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__)
    parser.add_argument("--storm", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=60)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="outage-"))
    waited = scenario(base / "waited-out", args.storm, "15m", args.images)
    print(f"503 storm of {args.storm:g} s, outage_wait 15m: {waited}")
    given_up = scenario(base / "given-up", args.storm, f"{args.storm / 3:g}s", args.images)
    print(f"503 storm of {args.storm:g} s, outage_wait {args.storm / 3:g}s: {given_up}")


if __name__ == "__main__":
    main()
