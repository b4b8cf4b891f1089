"""Running the emulator from synchronous code (EmulatorThread + boto3) and as a CLI process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError

from batch_upscaler.emulator import EmulatorConfig, EmulatorThread, FaultKind, RequestLog, image_key

from .helpers import CREDENTIALS, FAST, body, make_image

ROOT = Path(__file__).resolve().parents[2]


def _client(endpoint_url: str) -> object:
    return boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=endpoint_url,
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}), **CREDENTIALS)


def _invoke(client: object, image: bytes) -> dict[str, object]:
    response = client.invoke_model(  # type: ignore[attr-defined]
        modelId=FAST, body=json.dumps(body(image)), contentType="application/json", accept="application/json")
    answer: dict[str, object] = json.loads(response["body"].read())
    return answer


def test_emulator_thread_with_boto3() -> None:
    image = make_image(64, 64)
    faults = {image_key(image): (FaultKind.THROTTLE, FaultKind.NONE, FaultKind.DISCONNECT)}
    with EmulatorThread(EmulatorConfig(output_max_pixels=128 * 128, faults_by_image=faults)) as emulator:
        client = _client(emulator.endpoint_url)
        with pytest.raises(ClientError) as caught:
            _invoke(client, image)
        assert caught.value.response["Error"]["Code"] == "ThrottlingException"
        assert _invoke(client, image)["finish_reasons"] == [None]
        # Unlike aiobotocore, sync botocore turns the cut-off body into its own ResponseStreamingError.
        with pytest.raises(ResponseStreamingError):
            _invoke(client, image)
        records = emulator.records()
    assert [(r.status, r.fault) for r in records] == [(429, "throttle"), (200, None), (200, "disconnect")]
    assert records[1].output_size == (128, 128)


def test_emulator_thread_reports_a_startup_failure() -> None:
    with EmulatorThread() as first:
        port = int(first.endpoint_url.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match="failed to start"):
            EmulatorThread(EmulatorConfig(port=port)).start()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_forever_cli_announces_serves_and_stops_on_signal(tmp_path: Path, signum: int) -> None:
    log_path = tmp_path / "requests.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "batch_upscaler.emulator", "--output-max-pixels", "4096",
         "--log", str(log_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        endpoint = line.split(" on ", 1)[1].strip()
        assert _invoke(_client(endpoint), make_image(64, 64))["finish_reasons"] == [None]
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    (record,) = RequestLog.read_file(log_path)
    assert (record.status, record.output_size) == (200, (64, 64))
