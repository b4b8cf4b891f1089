"""Scenario ``baselines``: what a user would write instead, against the same emulator as ``known``.

(a) the seed document's sequential boto3 loop (default client config: legacy retries), (b) a naive
``asyncio.gather`` over aiobotocore with ``Semaphore(16)`` and ``retries={'mode': 'standard'}``,
(c) the same with ``'adaptive'``, then the runner at a fixed 600 RPM and on ``auto``. Every variant
gets the same images, a fresh emulator and the same time cap; images not finished within the cap
are counted as "not done" (the sequential loop cannot finish 300 images at 0.5 s each in 120 s).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import boto3
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from bench import job
from bench.accounting import summarize
from bench.emulator_process import EmulatorProcess, EmulatorSpec
from bench.table import Check, Row, ScenarioResult
from bench.throughput import (
    COLUMNS,
    CONCURRENCY,
    EMULATOR,
    QUOTA_RPM,
    corpus,
    emulator_ceiling,
    measure_runner,
    slug,
    traffic_row,
)
from bench.workspace import Workspace

IMAGES, SMOKE_IMAGES = 300, 6
TIME_CAP_S, SMOKE_TIME_CAP_S = 120.0, 15.0
MODEL_ID = "us.stability.stable-conservative-upscale-v1:0"
_ERRORS = (ClientError, BotoCoreError)


def _params(path: Path) -> str:
    """The seed document's request body for one image."""
    image_base64 = base64.b64encode(path.read_bytes()).decode("utf-8")
    return json.dumps({"image": image_base64, "prompt": job.PROMPT, "creativity": 0.30, "output_format": "png"})


def sequential_boto3(endpoint_url: str, images: list[Path], out: Path, deadline: float) -> int:
    """(a) The seed document's loop, one image at a time; returns the number of failed images."""
    bedrock = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=endpoint_url)
    failed = 0
    for path in images:
        if time.monotonic() >= deadline:
            break
        try:
            response = bedrock.invoke_model(modelId=MODEL_ID, body=_params(path))
            result = json.loads(response["body"].read())
            image_data = base64.b64decode(result["images"][0])
            Image.open(io.BytesIO(image_data)).save(out / f"{path.stem}.png")
        except _ERRORS:
            failed += 1
    return failed


async def naive_gather(endpoint_url: str, images: list[Path], out: Path, deadline: float, mode: str) -> int:
    """(b)/(c) ``asyncio.gather`` under ``Semaphore(16)`` with botocore's own retries in ``mode``."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    failed = 0
    # max_pool_connections: the default (10) would cap the 16 in flight; a fair baseline sets it.
    config = AioConfig(retries={"mode": mode}, max_pool_connections=CONCURRENCY)
    async with get_session().create_client("bedrock-runtime", region_name="us-east-1",
                                           endpoint_url=endpoint_url, config=config) as client:
        async def one(path: Path) -> None:
            nonlocal failed
            async with semaphore:
                if time.monotonic() >= deadline:
                    return
                try:
                    response = await client.invoke_model(modelId=MODEL_ID, body=_params(path))
                    result = json.loads(await response["body"].read())
                    (out / f"{path.stem}.png").write_bytes(base64.b64decode(result["images"][0]))
                except _ERRORS:
                    failed += 1

        remaining = max(0.0, deadline - time.monotonic())
        # Requests still in flight 30 s past the cap are abandoned: what finished is counted.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(path) for path in images)), remaining + 30.0)
    return failed


def measure_baseline(workspace: Workspace, variant: str, images: int, cap_s: float,
                     loop: Callable[[str, list[Path], Path, float], int],
                     emulator_spec: EmulatorSpec = EMULATOR) -> Row:
    """One of the loops above on ``images`` distinct inputs against a fresh emulator."""
    inputs = sorted(corpus(workspace, images).glob("*.png"))
    work = workspace.fresh(slug(variant))
    out = work / "out"
    out.mkdir()
    with EmulatorProcess(emulator_spec, work / "requests.jsonl") as emulator:
        started = time.monotonic()
        failed = loop(emulator.endpoint_url, inputs, out, started + cap_s)
        elapsed = time.monotonic() - started
        traffic = summarize(emulator.records())
    return traffic_row(variant, images, traffic, elapsed, failed, emulator_ceiling(emulator_spec))


def gather_loop(mode: str) -> Callable[[str, list[Path], Path, float], int]:
    """(b)/(c) as a loop for :func:`measure_baseline`: ``mode`` is botocore's retry mode."""
    def loop(endpoint_url: str, images: list[Path], out: Path, deadline: float) -> int:
        return asyncio.run(naive_gather(endpoint_url, images, out, deadline, mode))
    return loop


def run(workspace: Workspace) -> ScenarioResult:
    job.use_dummy_credentials()
    images = SMOKE_IMAGES if workspace.smoke else IMAGES
    cap = SMOKE_TIME_CAP_S if workspace.smoke else TIME_CAP_S
    rows = [
        measure_baseline(workspace, "(a) sequential boto3 (seed)", images, cap, sequential_boto3),
        measure_baseline(workspace, "(b) gather+Semaphore(16), standard", images, cap, gather_loop("standard")),
        measure_baseline(workspace, "(c) gather+Semaphore(16), adaptive", images, cap, gather_loop("adaptive")),
        measure_runner(workspace, f"runner rpm={QUOTA_RPM:g}", QUOTA_RPM, images, time_cap_s=cap),
        measure_runner(workspace, "runner rpm=auto", "auto", images, time_cap_s=cap),
    ]
    result = ScenarioResult("baselines", workspace.smoke, COLUMNS, rows)
    result.notes.append(f"time cap {cap:g} s per variant; 'not done' = images not finished within it")
    runner_failed = sum(row["failed"] for row in rows[3:])
    result.checks = [Check("runner failed images", runner_failed, "0", runner_failed == 0)]
    return result
