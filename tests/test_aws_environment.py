"""The AWS environment people already have (AWS_REGION, AWS_DEFAULT_REGION, the profile's region,
AWS_ENDPOINT_URL[_BEDROCK_RUNTIME]) is a configuration layer: below flags, manifest and config file,
above the built-in us-east-1.

Every test runs the real command in a subprocess with a hermetic environment (no AWS_* variable of
the machine, a temporary AWS config file). The region is observed where it really shows: in
``plan --json``, and in the region the emulator's requests were signed for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batch_upscaler.emulator import EmulatorThread
from tests.conftest import cli_env, manifest_doc, write_image

EmulatorFactory = Callable[..., EmulatorThread]
PROFILE_ID = "us.stability.stable-conservative-upscale-v1:0"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command with the test's dummy keys, no AWS config file, and ``env`` on top."""
    return subprocess.run([sys.executable, "-m", "batch_upscaler", *args], cwd=cwd,
                          env=cli_env() | (env or {}), capture_output=True, text=True, timeout=120)


@pytest.fixture
def bedrock_job(tmp_path: Path, write_manifest: Callable[..., Path]) -> Callable[..., Path]:
    """A backend: bedrock manifest with no region and no endpoint of its own (two small images)."""
    for i in range(2):
        write_image(tmp_path / "photos" / f"{i}.png", 90, 90, color=(i * 90, 40, 40))

    def make(**bedrock: Any) -> Path:
        doc = manifest_doc(backend="bedrock")
        if bedrock:
            doc["bedrock"] = bedrock
        return write_manifest(doc)
    return make


def plan(manifest: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    done = cli("plan", str(manifest), "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def aws_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "aws-config"
    path.write_text(text)
    return str(path)


def test_a_run_signs_for_aws_region_and_goes_to_aws_endpoint_url_bedrock_runtime(
        bedrock_job: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    env = {"AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": emulator.endpoint_url}
    done = cli("run", str(bedrock_job()), env=env)
    assert done.returncode == 0, done.stderr
    records = emulator.records()
    assert len(records) == 2  # the requests went to the endpoint the environment names
    assert {(r.status, r.model_id, r.signing_region) for r in records} == {(200, PROFILE_ID, "us-west-2")}
    assert "us-west-2 (from AWS_REGION)" in done.stderr
    assert f"{emulator.endpoint_url} (from AWS_ENDPOINT_URL_BEDROCK_RUNTIME)" in done.stderr


def test_aws_endpoint_url_is_honoured_too(bedrock_job: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    done = cli("run", str(bedrock_job()), env={"AWS_ENDPOINT_URL": emulator.endpoint_url})
    assert done.returncode == 0, done.stderr
    assert {r.signing_region for r in emulator.records()} == {"us-east-1"}  # the built-in default
    assert len(emulator.records()) == 2


def test_flag_and_manifest_regions_beat_aws_region(
        bedrock_job: Callable[..., Path], emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    env = {"AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": emulator.endpoint_url}
    manifest = bedrock_job(region="us-east-2")
    assert plan(manifest, env)["bedrock"]["region"] == "us-east-2"
    done = cli("run", str(manifest), "--max-images", "1", env=env)
    assert done.returncode == 75, done.stderr
    done = cli("run", str(manifest), "--region", "us-east-1", env=env)
    assert done.returncode == 0, done.stderr
    assert [r.signing_region for r in emulator.records()] == ["us-east-2", "us-east-1"]


@pytest.mark.parametrize(("env", "region", "source"), [
    ({"AWS_REGION": "us-west-2"}, "us-west-2", "AWS_REGION"),
    ({"AWS_DEFAULT_REGION": "us-east-2"}, "us-east-2", "AWS_DEFAULT_REGION"),
    ({"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-east-2"}, "us-west-2", "AWS_REGION"),
    ({"AWS_PROFILE": "x"}, "us-east-2", "profile x"),
    ({"AWS_PROFILE": "x", "AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2", "AWS_DEFAULT_REGION"),
    ({}, "us-west-2", "profile default"),
])
def test_plan_shows_the_region_the_environment_gives(
        tmp_path: Path, bedrock_job: Callable[..., Path], env: dict[str, str], region: str, source: str) -> None:
    env = env | {"AWS_CONFIG_FILE": aws_config(tmp_path, "[default]\nregion = us-west-2\n"
                                                         "[profile x]\nregion = us-east-2\n")}
    bedrock = plan(bedrock_job(), env)["bedrock"]
    assert (bedrock["region"], bedrock["region_source"]) == (region, source)
    assert bedrock["endpoint_url"] is None and bedrock["endpoint_source"] == "default"


def test_the_manifest_profile_picks_the_profile_region(tmp_path: Path, bedrock_job: Callable[..., Path]) -> None:
    env = {"AWS_CONFIG_FILE": aws_config(tmp_path, "[profile x]\nregion = us-east-2\n"), "AWS_PROFILE": "nosuch"}
    bedrock = plan(bedrock_job(profile="x"), env)["bedrock"]
    assert (bedrock["region"], bedrock["region_source"], bedrock["profile"]) == ("us-east-2", "profile x", "x")


def test_no_environment_gives_the_built_in_region(bedrock_job: Callable[..., Path]) -> None:
    bedrock = plan(bedrock_job(), {})["bedrock"]
    assert (bedrock["region"], bedrock["region_source"], bedrock["profile"]) == ("us-east-1", "default", None)


def test_config_file_region_beats_the_environment(tmp_path: Path, bedrock_job: Callable[..., Path]) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text("bedrock: {region: us-east-2, endpoint_url: 'http://127.0.0.1:9'}\n")
    env = {"AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://127.0.0.1:8"}
    bedrock = plan(bedrock_job(), env, "--config", str(config))["bedrock"]
    assert (bedrock["region"], bedrock["region_source"]) == ("us-east-2", "config file")
    assert (bedrock["endpoint_url"], bedrock["endpoint_source"]) == ("http://127.0.0.1:9", "config file")


def test_plan_shows_the_endpoint_the_environment_gives(bedrock_job: Callable[..., Path]) -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": "http://127.0.0.1:9"}
    bedrock = plan(bedrock_job(), env)["bedrock"]
    assert (bedrock["endpoint_url"], bedrock["endpoint_source"]) == ("http://127.0.0.1:9",
                                                                      "AWS_ENDPOINT_URL_BEDROCK_RUNTIME")
    bedrock = plan(bedrock_job(endpoint_url="http://127.0.0.1:7"), env)["bedrock"]
    assert (bedrock["endpoint_url"], bedrock["endpoint_source"]) == ("http://127.0.0.1:7", "manifest")


def test_a_region_without_a_prefix_from_the_environment_names_the_variable(bedrock_job: Callable[..., Path]) -> None:
    done = cli("plan", str(bedrock_job()), env={"AWS_REGION": "eu-west-1"})
    assert done.returncode == 2
    assert "AWS_REGION=eu-west-1: no inference-profile prefix is known for 'eu-west-1'" in done.stderr


def test_the_embedded_emulator_ignores_the_aws_environment(write_manifest: Callable[..., Path],
                                                           tmp_path: Path) -> None:
    write_image(tmp_path / "photos" / "a.png", 90, 90)
    done = cli("run", str(write_manifest()), env={"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert done.returncode == 0, done.stderr
