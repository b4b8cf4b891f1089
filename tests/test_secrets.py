"""Credentials and request bodies never reach logs, reports, the checkpoint or error messages."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from batch_upscaler.emulator import EmulatorThread, FaultKind
from tests.conftest import cli_env, write_image

EmulatorFactory = Callable[..., EmulatorThread]
SENTINELS = {"AWS_ACCESS_KEY_ID": "AKIASENTINEL7Q3XW9ZK", "AWS_SECRET_ACCESS_KEY": "sentinelSecretKey/v4lue+9Xq",
             "AWS_SESSION_TOKEN": "sentinelSessionTokenFwoGZXIvYXdzE"}


def run(manifest: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batch_upscaler", "run", str(manifest), "-v", *flags],
                          env=cli_env() | SENTINELS, capture_output=True, text=True, timeout=120)


def test_no_secret_or_body_in_any_artefact_of_a_failing_run(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    images = [write_image(tmp_path / "photos" / f"{i}.png", 90, 90, color=(i * 40, 9, 9)) for i in range(4)]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
    log_file = tmp_path / "emulator.jsonl"
    faults = {digests[0]: (FaultKind.VALIDATION,), digests[1]: (FaultKind.CONTENT_FILTERED,),
              digests[2]: (FaultKind.THROTTLE,) * 3 + (FaultKind.TRUNCATED,) * 3}
    emulator = emulator_factory(faults_by_image=faults, request_log_path=log_file)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"max_attempts": 4})
    failing = run(manifest)
    assert failing.returncode == 1, failing.stderr
    denied = emulator_factory(deny_access=True)
    fatal = run(manifest, "--endpoint-url", denied.endpoint_url, "--retry-failed")
    assert fatal.returncode == 3, fatal.stderr

    artefacts = {"stdout": failing.stdout + fatal.stdout, "stderr": failing.stderr + fatal.stderr}
    for path in (tmp_path / ".batch-upscaler").rglob("*"):
        if path.is_file():
            artefacts[str(path)] = path.read_bytes().decode("latin-1")
    artefacts["emulator log"] = log_file.read_text()
    body_pieces = [base64.b64encode(p.read_bytes()).decode()[10:60] for p in images]
    for name, text in artefacts.items():
        for secret in SENTINELS.values():
            assert secret not in text, f"{secret} leaked into {name}"
        for piece in body_pieces:
            assert piece not in text, f"request body leaked into {name}"
    assert "ValidationException" in failing.stderr  # the run did report its failures


def test_no_secret_in_doctor_output_whatever_its_checks_meet(emulator_factory: EmulatorFactory) -> None:
    with socket.socket() as sock:  # a port nothing listens on: STS cannot be reached
        sock.bind(("127.0.0.1", 0))
        no_sts = f"http://127.0.0.1:{sock.getsockname()[1]}"
    outputs = []
    for emulator in (emulator_factory(), emulator_factory(deny_access=True)):
        done = subprocess.run([sys.executable, "-m", "batch_upscaler", "doctor", "-v", "--endpoint-url",
                               emulator.endpoint_url], env=cli_env() | SENTINELS | {"AWS_ENDPOINT_URL": no_sts},
                              capture_output=True, text=True, timeout=60)
        outputs.append(done.stdout + done.stderr)
    text = "\n".join(outputs)
    assert "WARN  identity" in text and "AccessDeniedException" in text and "AKIA…W9ZK" in text
    for secret in SENTINELS.values():
        for piece in (secret, secret[:12], secret[-12:]):
            assert piece not in text
