"""Every fault the emulator can inject meets its documented policy: attempts, recorded reason, exit code.

The number of attempts recorded for an image must equal the number of requests the server saw
for it: nothing is re-sent behind the checkpoint's back (botocore's own retries are off).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from batch_upscaler.cli import main
from batch_upscaler.emulator import EmulatorThread, FaultKind
from tests.conftest import write_image

EmulatorFactory = Callable[..., EmulatorThread]
MAX_ATTEMPTS = 3
# fault -> (recorded error code, attempts made)
POLICY = {
    FaultKind.THROTTLE: ("ThrottlingException", MAX_ATTEMPTS),
    FaultKind.MODEL_NOT_READY: ("ModelNotReadyException", MAX_ATTEMPTS),
    FaultKind.SERVICE_UNAVAILABLE: ("ServiceUnavailableException", MAX_ATTEMPTS),
    FaultKind.INTERNAL_ERROR: ("InternalServerException", MAX_ATTEMPTS),
    FaultKind.HANGUP: ("connection_error", MAX_ATTEMPTS),
    FaultKind.MODEL_TIMEOUT: ("ModelTimeoutException", 2),
    FaultKind.MODEL_ERROR: ("ModelErrorException", 2),
    FaultKind.DISCONNECT: ("response_interrupted", 2),
    FaultKind.SLOW: ("read_timeout", 2),
    FaultKind.TRUNCATED: ("bad_response", 2),
    FaultKind.NON_JSON: ("bad_response", 2),
    FaultKind.BAD_BASE64: ("bad_response", 2),
    FaultKind.CORRUPT_IMAGE: ("bad_response", 2),  # well-formed JSON and base64, a damaged PNG: checked
    FaultKind.VALIDATION: ("ValidationException", 1),
    FaultKind.CONTENT_FILTERED: ("content_filtered", 1),
}


@pytest.fixture(autouse=True)
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def test_each_fault_follows_its_policy(tmp_path: Path, write_manifest: Callable[..., Path],
                                       emulator_factory: EmulatorFactory) -> None:
    scripts, names = {}, {}
    for n, fault in enumerate(POLICY):
        path = write_image(tmp_path / "photos" / f"{fault.value}.png", 80 + n, 70, color=(n * 15, 3, 4))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        scripts[digest] = (fault,) * 10
        names[fault] = digest
    write_image(tmp_path / "photos" / "fine.png", 64, 64, color=(1, 1, 1))
    emulator = emulator_factory(faults_by_image=scripts, slow_s=3.0)
    # outage_errors off: each image here fails on its own script, so 5xx runs are the image's, not an outage.
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"concurrency": 8, "max_attempts": MAX_ATTEMPTS, "read_timeout_s": 0.5,
                                      "outage_errors": 1000})
    assert main(["run", str(manifest)]) == 1
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    items = {item["source"]: item for item in report["items"]}
    seen = {digest: 0 for digest in names.values()}
    for record in emulator.records():
        if record.image_sha256 in seen:
            seen[record.image_sha256] += 1
    for fault, (code, attempts) in POLICY.items():
        item = items[f"photos/{fault.value}.png"]
        assert (item["status"], item["error_code"], item["attempts"]) == ("failed", code, attempts), fault
        assert item["error_message"].startswith(f"{code}: ")
        assert seen[names[fault]] == attempts, f"{fault}: server saw {seen[names[fault]]}, recorded {attempts}"
    assert items["photos/fine.png"]["status"] == "succeeded"
    assert report["failures_by_reason"]["bad_response"] == 4
    corrupt = items[f"photos/{FaultKind.CORRUPT_IMAGE.value}.png"]
    assert "returned image is damaged: PNG chunk IDAT" in corrupt["error_message"] and corrupt["output"] is None
    assert not (tmp_path / "out" / f"{FaultKind.CORRUPT_IMAGE.value}.png").exists()


def test_a_fault_that_clears_is_retried_to_success(tmp_path: Path, write_manifest: Callable[..., Path],
                                                   emulator_factory: EmulatorFactory) -> None:
    path = write_image(tmp_path / "photos" / "p.png")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    emulator = emulator_factory(faults_by_image={digest: (FaultKind.SLOW,)}, slow_s=3.0)
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url},
                              limits={"read_timeout_s": 0.5})
    assert main(["run", str(manifest)]) == 0
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    assert report["items"][0]["attempts"] == 2 == len(emulator.records())


def test_a_damaged_image_in_a_200_is_re_sent_once_and_never_stored(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    path = write_image(tmp_path / "photos" / "p.png")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    emulator = emulator_factory(faults_by_image={digest: (FaultKind.CORRUPT_IMAGE,)})
    manifest = write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url})
    assert main(["run", str(manifest)]) == 0
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    assert report["items"][0]["attempts"] == 2 == len(emulator.records())
    assert [r.fault for r in emulator.records()] == ["corrupt_image", None]
    with Image.open(tmp_path / "out/p.png") as im:
        im.load()  # the stored output is the second, good answer, whole
