"""Manifest and config validation: every problem names its key path, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batch_upscaler.cli import main
from batch_upscaler.errors import ManifestError
from batch_upscaler.manifest import load_settings
from batch_upscaler.settings import Backend, MetadataSettings, OutputFormat, request_fingerprint
from tests.conftest import manifest_doc


def problems_for(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_settings(path)
    return info.value.problems


def doc_problems(tmp_path: Path, doc: dict[str, Any]) -> list[str]:
    import yaml

    return problems_for(tmp_path, yaml.safe_dump(doc))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"limits": {"concurrency": 0}}, "limits.concurrency: must be ≥ 1, got 0"),
    ({"limits": {"concurrency": 2.5}}, "limits.concurrency: must be a whole number, got 2.5"),
    ({"limits": {"requests_per_minute": "fast"}}, "limits.requests_per_minute: must be a number, got str 'fast'"),
    ({"limits": {"requests_per_minute": 0}}, "limits.requests_per_minute: must be > 0, got 0"),
    ({"limits": {"read_timeout_s": 0}}, "limits.read_timeout_s: must be > 0, got 0"),
    ({"limits": {"max_attempts": True}}, "limits.max_attempts: must be a whole number, got bool True"),
    ({"limits": {"bogus": 1}}, "limits.bogus: unknown key"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"version": 2}, "version: must be 1, got 2"),
    ({"name": "a b/c"}, "name: must be 1-64 letters"),
    ({"sources": []}, "sources: must be a non-empty list of strings, got list"),
    ({"sources": ["ok", 3]}, "sources: item 1 must be a non-empty string, got int"),
    ({"output": {"format": "gif"}}, "output.format: must be one of png, jpeg, webp, same, got 'gif'"),
    ({"model": {"name": "turbo"}}, "model.name: must be one of conservative, creative, fast, got 'turbo'"),
    ({"backend": "azure"}, "backend: must be one of bedrock, emulator, got 'azure'"),
    ({"bedrock": {"endpoint_url": "localhost:80"}}, "bedrock.endpoint_url: must be an http(s) URL"),
    ({"emulator": {"latency_s": -1}}, "emulator.latency_s: must be ≥ 0, got -1"),
    ({"output": {"naming": "{stem}-{size}"}}, "output.naming: unknown field(s) {size}"),
    ({"output": {"naming": "fixed"}}, "output.naming: must use at least one field"),
    ({"output": {"metadata": {"gps": "no"}}}, "output.metadata.gps: must be true or false, got str 'no'"),
    ({"output": {"metadata": {"send_metadata": 0}}}, "output.metadata.send_metadata: must be true or false, got int 0"),
    ({"prepare": {"oversize": "crop"}}, "prepare.oversize: must be one of downscale, skip, got 'crop'"),
    ({"prepare": {"background": "white"}}, "prepare.background: must be a colour like '#ffffff'"),
])
def test_bad_values_name_their_key_path(tmp_path: Path, overrides: dict[str, Any], expected: str) -> None:
    problems = doc_problems(tmp_path, manifest_doc(**overrides))
    assert any(p.startswith(expected) for p in problems), problems


def test_send_metadata_is_read_and_leaves_the_request_fingerprint_alone(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(manifest_doc()))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(manifest_doc(output={"metadata": {"send_metadata": False,
                                                                                     "gps": False}})))
    default, stripped = load_settings(tmp_path / "a.yaml"), load_settings(tmp_path / "b.yaml")
    assert default.metadata.send_metadata is True
    assert stripped.metadata == MetadataSettings(gps=False, send_metadata=False)
    # Only metadata leaves what is sent, so the returned image, and finished items, stay valid.
    assert request_fingerprint(default) == request_fingerprint(stripped)


@pytest.mark.parametrize(("model", "expected"), [
    ({"name": "conservative", "prompt": "x", "creativity": 0.9}, "model.creativity: must be ≤ 0.5, got 0.9"),
    ({"name": "conservative", "prompt": "x", "creativity": 0.05}, "model.creativity: must be ≥ 0.1, got 0.05"),
    ({"name": "conservative"}, "model.prompt: is required"),
    ({"name": "conservative", "prompt": ""}, "model.prompt: must not be empty"),
    ({"name": "fast", "prompt": "x"}, "model.prompt: is not accepted by this model"),
    ({"name": "conservative", "prompt": "x", "style_preset": "anime"}, "model.style_preset: is not accepted"),
    ({"name": "creative", "prompt": "x", "style_preset": "oil"}, "model.style_preset: must be one of"),
    ({"name": "creative", "prompt": "x", "seed": -1}, "model.seed: must be ≥ 0, got -1"),
])
def test_model_parameters_follow_the_catalogue(tmp_path: Path, model: dict[str, Any], expected: str) -> None:
    doc = manifest_doc()
    doc["model"] = model
    problems = doc_problems(tmp_path, doc)
    assert any(p.startswith(expected) for p in problems), problems


def test_missing_required_keys_are_all_reported(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, "version: 1\n")
    assert {"name: is required", "sources: is required", "output: is required", "model: is required"} <= set(problems)


@pytest.mark.parametrize("text", [
    "just a string", "- a\n- list", "", "version: [1\n",
    "version: 1\nname: !!python/object/apply:os.system ['echo pwned']\n",
])
def test_non_mapping_malformed_and_object_building_yaml_are_rejected(tmp_path: Path, text: str) -> None:
    problems = problems_for(tmp_path, text)
    assert problems and all(isinstance(p, str) for p in problems)


def test_region_without_profile_prefix(tmp_path: Path) -> None:
    problems = doc_problems(tmp_path, manifest_doc(bedrock={"region": "eu-west-1"}))
    assert problems == ["bedrock.region: no inference-profile prefix is known for 'eu-west-1'; "
                        "add it under region_prefixes in the config file"]


def test_layers_merge_flags_over_manifest_over_config_over_builtin(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("limits: {concurrency: 7, max_attempts: 9}\nbedrock: {region: us-west-2}\n"
                      "models: {conservative: {max_pixels: 1048576, price_usd: 0.5}}\n")
    manifest = tmp_path / "m.yaml"
    import yaml

    doc = manifest_doc(limits={"concurrency": 3})
    doc["limits"].pop("requests_per_minute")
    manifest.write_text(yaml.safe_dump(doc))
    settings = load_settings(manifest, config, {"limits": {"concurrency": 5}})
    assert settings.limits.concurrency == 5  # flag beats manifest (3) and config (7)
    assert settings.limits.max_attempts == 9  # config beats the built-in 6
    assert settings.limits.requests_per_minute == 30  # built-in
    assert settings.region == "us-west-2"
    assert settings.model_id == "us.stability.stable-conservative-upscale-v1:0"
    assert settings.model.limits.max_pixels == 1_048_576 and settings.model.price_usd == 0.5
    assert settings.backend is Backend.EMULATOR and settings.output_format is OutputFormat.PNG
    assert settings.output_dir == tmp_path / "out"
    assert settings.state_dir == tmp_path / ".batch-upscaler"
    assert settings.report_dir == tmp_path / ".batch-upscaler" / "reports" / "job"
    assert dict(settings.params) == {"prompt": "a sharp photo"}
    auto = load_settings(manifest, config, {"limits": {"requests_per_minute": "auto"}})
    assert auto.limits.requests_per_minute is None


def test_config_file_errors_name_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("limits: {concurrency: -1}\nsources: [x]\n")
    manifest = tmp_path / "m.yaml"
    import yaml

    manifest.write_text(yaml.safe_dump(manifest_doc()))
    with pytest.raises(ManifestError) as info:
        load_settings(manifest, config)
    assert info.value.source == str(config)
    assert set(info.value.problems) == {"limits.concurrency: must be ≥ 1, got -1", "sources: unknown key"}


def test_cli_exits_2_with_key_path_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest_doc(limits={"concurrency": 0})))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "limits.concurrency: must be ≥ 1, got 0" in err
    assert "Traceback" not in err


def test_cli_missing_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path / "nope.yaml")]) == 2
    assert "manifest file not found" in capsys.readouterr().err


def test_the_aws_environment_is_a_layer_between_the_config_file_and_the_built_ins(tmp_path: Path) -> None:
    import yaml

    from batch_upscaler.manifest import AwsEnvironment, build_settings, manifest_layers

    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(manifest_doc(backend="bedrock")))
    config = tmp_path / "config.yaml"
    config.write_text("bedrock: {region: us-east-2}\n")
    aws = AwsEnvironment(region="us-west-2", region_source="AWS_REGION", profile="x",
                         endpoint_url="http://127.0.0.1:9", endpoint_source="AWS_ENDPOINT_URL")
    settings = build_settings(manifest_layers(manifest), aws)
    assert (settings.region, settings.aws.region) == ("us-west-2", "AWS_REGION")  # the environment beats us-east-1
    assert settings.endpoint_url is None and settings.profile is None  # left to botocore, which reads them itself
    assert (settings.aws.endpoint_url, settings.aws.endpoint, settings.aws.profile) == (
        "http://127.0.0.1:9", "AWS_ENDPOINT_URL", "x")
    from_config = build_settings(manifest_layers(manifest, config), aws)
    assert (from_config.region, from_config.aws.region) == ("us-east-2", "config file")
    flagged = build_settings(manifest_layers(manifest, config, {"bedrock": {"region": "us-east-1",
                                                                          "endpoint_url": "http://127.0.0.1:8"}}), aws)
    assert (flagged.region, flagged.aws.region, flagged.endpoint_url, flagged.aws.endpoint) == (
        "us-east-1", "--region", "http://127.0.0.1:8", "--endpoint-url")
    manifest.write_text(yaml.safe_dump(manifest_doc()))  # backend: emulator needs no AWS set-up
    emulated = build_settings(manifest_layers(manifest), aws)
    assert (emulated.region, emulated.aws.region, emulated.aws.endpoint) == (
        "us-east-1", "default", "embedded emulator")
