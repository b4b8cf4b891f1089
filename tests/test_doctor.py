"""``doctor``: each check says ok or the exact fix; STS and the control plane run against moto's server
mode, the invoke path against the project's emulator, and no credential ever reaches the output.

moto 5.2.5 implements ``sts get-caller-identity`` but not ``bedrock list-inference-profiles`` (its
server answers HTTP 500 with an HTML page), so against moto the profile check honestly WARNs. The
profile-found / profile-missing logic is exercised with a botocore Stubber on the bedrock client.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer

from batch_upscaler.doctor import (
    ACCESS,
    CREDENTIALS,
    ENDPOINT,
    IDENTITY,
    PROFILE,
    QUOTA,
    REGION,
    CheckResult,
    DoctorOptions,
    Status,
    exit_code,
    options_from_settings,
    redactor,
    render,
    run_checks,
)
from batch_upscaler.emulator import EmulatorThread
from batch_upscaler.manifest import load_settings
from batch_upscaler.quotas import QuotaTarget
from tests.conftest import cli_env

EmulatorFactory = Callable[..., EmulatorThread]
BASE_ID = "stability.stable-conservative-upscale-v1:0"
PROFILE_ID = f"us.{BASE_ID}"
KEY_ID = "AKIASENTINEL7Q3XW9ZK"
SECRET = "sentinelSecretKey/v4lue+9Xq"
TOKEN = "sentinelSessionTokenFwoGZXIvYXdzE"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credential source of the machine running the tests may leak in (files, env, IMDS)."""
    import os
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def with_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)


def options(control: str | None, runtime: str | None, **overrides: Any) -> DoctorOptions:
    fields: dict[str, Any] = {"region": "us-east-1", "profile": None, "model_id": PROFILE_ID,
                              "base_model_id": BASE_ID, "runtime_endpoint_url": runtime,
                              "control_endpoint_url": control, "connect_timeout_s": 2.0, "read_timeout_s": 5.0}
    return DoctorOptions(**(fields | overrides))


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- the invoke path against the emulator, STS against moto -------------------------------------


@pytest.mark.timeout(10)  # one attempt per call: moto's HTTP 500 must not be retried with back-off
@pytest.mark.usefixtures("with_env_keys")
def test_healthy_setup_is_ok_and_the_probe_is_one_rejected_request(
        moto_url: str, emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    results = run_checks(options(moto_url, emulator.endpoint_url))
    assert [r.name for r in results] == [CREDENTIALS, IDENTITY, REGION, ENDPOINT, PROFILE, ACCESS]
    checks = by_name(results)
    assert [r.status for r in results] == [Status.OK, Status.OK, Status.OK, Status.OK, Status.WARN, Status.OK]
    assert checks[CREDENTIALS].detail.startswith("from environment variables, key AKIA…W9ZK")
    assert "temporary" in checks[CREDENTIALS].detail
    assert checks[IDENTITY].detail == f"arn:aws:sts::123456789012:user/moto (account 123456789012) via {moto_url}"
    assert checks[ENDPOINT].detail == f"bedrock-runtime {emulator.endpoint_url}, configured"
    # moto has no list-inference-profiles: reported as a warning, not a failure.
    assert checks[PROFILE].detail.startswith("could not list inference profiles (HTTP 500:")
    assert "ValidationException" in checks[ACCESS].detail
    assert "no image was generated and nothing was billed" in checks[ACCESS].detail
    assert exit_code(results) == 0
    [record] = emulator.records()  # exactly one request reached the model, and it was refused
    assert (record.status, record.error_type, record.model_id) == (400, "ValidationException", PROFILE_ID)
    assert record.output_size is None


@pytest.mark.usefixtures("with_env_keys")
def test_access_denied_fails_with_the_model_access_fix(moto_url: str, emulator_factory: EmulatorFactory) -> None:
    results = run_checks(options(moto_url, emulator_factory(deny_access=True).endpoint_url))
    access = by_name(results)[ACCESS]
    assert access.status is Status.FAIL
    assert access.detail.startswith("AccessDeniedException: ")
    assert access.fix is not None
    assert "request access to Stability AI image services in the Bedrock console" in access.fix
    assert "bedrock:InvokeModel" in access.fix and "us-east-1, us-east-2, us-west-2" in access.fix
    assert exit_code(results) == 3


@pytest.mark.usefixtures("with_env_keys")
def test_bare_model_id_fails_with_use_the_inference_profile(
        moto_url: str, emulator_factory: EmulatorFactory) -> None:
    results = run_checks(options(moto_url, emulator_factory().endpoint_url, model_id=BASE_ID))
    access = by_name(results)[ACCESS]
    assert access.status is Status.FAIL
    assert "on-demand throughput isn't supported" in access.detail
    assert access.fix == f"use the inference profile id {PROFILE_ID} instead of the bare model id {BASE_ID}"
    assert exit_code(results) == 3


@pytest.mark.usefixtures("with_env_keys")
def test_unreachable_runtime_endpoint_fails_with_the_network_fix(moto_url: str) -> None:
    access = by_name(run_checks(options(moto_url, closed_port_url())))[ACCESS]
    assert access.status is Status.FAIL
    assert access.detail.startswith("InvokeModel could not be sent (EndpointConnectionError")
    assert access.fix is not None and access.fix.startswith("cannot reach the bedrock-runtime endpoint")


# --- early failures skip what depends on them ------------------------------------------------------


def test_no_credentials_fails_and_skips_the_checks_that_need_them(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    results = run_checks(options(closed_port_url(), emulator.endpoint_url))
    checks = by_name(results)
    assert checks[CREDENTIALS].status is Status.FAIL
    assert checks[CREDENTIALS].detail == "no AWS credentials found"
    assert "`aws configure`" in (checks[CREDENTIALS].fix or "")
    assert checks[REGION].status is Status.OK  # needs no credentials, so it still runs
    for name in (IDENTITY, PROFILE, ACCESS):
        assert checks[name] == CheckResult(name, Status.SKIP, "not run: the credentials check failed")
    assert emulator.records() == []
    assert exit_code(results) == 3


def test_missing_named_profile_is_a_credentials_failure() -> None:
    checks = by_name(run_checks(options(None, None, profile="nope")))
    assert checks[CREDENTIALS].status is Status.FAIL
    assert checks[CREDENTIALS].detail == "AWS profile 'nope' not found"
    assert "aws configure --profile nope" in (checks[CREDENTIALS].fix or "")
    assert checks[ACCESS].status is Status.SKIP


@pytest.mark.usefixtures("with_env_keys")
def test_unsupported_region_fails_and_skips_the_bedrock_checks(moto_url: str) -> None:
    checks = by_name(run_checks(options(moto_url, None, region="eu-west-1")))
    assert checks[REGION].status is Status.FAIL
    assert checks[REGION].fix == "set bedrock.region (or --region) to one of us-east-1, us-east-2, us-west-2"
    assert checks[PROFILE].detail == checks[ACCESS].detail == "not run: the region check failed"


@pytest.mark.usefixtures("with_env_keys")
def test_unreachable_sts_warns_and_the_bedrock_checks_still_run(emulator_factory: EmulatorFactory) -> None:
    no_sts = closed_port_url()
    results = run_checks(options(no_sts, emulator_factory().endpoint_url))
    checks = by_name(results)
    assert checks[IDENTITY].status is Status.WARN
    assert checks[IDENTITY].detail.startswith(f"STS at {no_sts} could not be reached (EndpointConnectionError")
    assert (checks[IDENTITY].fix or "").startswith("runs do not need STS")
    assert checks[ACCESS].status is Status.OK
    assert exit_code(results) == 0


@pytest.mark.usefixtures("with_env_keys")
def test_unreachable_sts_and_bedrock_fail_on_model_access() -> None:
    results = run_checks(options(closed_port_url(), closed_port_url()))
    checks = by_name(results)
    assert checks[IDENTITY].status is Status.WARN and checks[ACCESS].status is Status.FAIL
    assert exit_code(results) == 3


# --- the inference-profile logic moto cannot serve: a Stubber on the bedrock client ---------------


class StubbedControlPlane:
    """A real session (real STS via moto, real runtime) whose ``bedrock`` client is a stubbed one."""

    def __init__(self, session: Any, bedrock: Any) -> None:
        self._session = session
        self._bedrock = bedrock
        self.profile_name = session.profile_name

    def get_credentials(self) -> Any:
        return self._session.get_credentials()

    def client(self, service: str, **kwargs: Any) -> Any:
        return self._bedrock if service == "bedrock" else self._session.client(service, **kwargs)


def summary(profile_id: str, status: str = "ACTIVE") -> dict[str, Any]:
    arns = [f"arn:aws:bedrock:{r}::foundation-model/{BASE_ID}" for r in ("us-west-2", "us-east-1", "us-east-2")]
    return {"inferenceProfileName": profile_id, "inferenceProfileArn": f"arn:aws:bedrock:us-east-1:1:x/{profile_id}",
            "inferenceProfileId": profile_id, "status": status, "type": "SYSTEM_DEFINED",
            "models": [{"modelArn": arn} for arn in arns]}


def run_with_stub(control: str, prepare: Callable[[Stubber], None]) -> dict[str, CheckResult]:
    session = boto3.session.Session(region_name="us-east-1")
    bedrock = session.client("bedrock", region_name="us-east-1")
    with Stubber(bedrock) as stubber:
        prepare(stubber)
        results = run_checks(options(control, closed_port_url()), StubbedControlPlane(session, bedrock))
        stubber.assert_no_pending_responses()
    return by_name(results)


@pytest.mark.usefixtures("with_env_keys")
def test_profile_found_on_a_later_page(moto_url: str) -> None:
    def prepare(stubber: Stubber) -> None:
        stubber.add_response("list_inference_profiles", {"inferenceProfileSummaries": [summary("us.other-v1:0")],
                                                         "nextToken": "page2"}, {})
        stubber.add_response("list_inference_profiles", {"inferenceProfileSummaries": [summary(PROFILE_ID)]},
                             {"nextToken": "page2"})
    profile = run_with_stub(moto_url, prepare)[PROFILE]
    assert profile == CheckResult(PROFILE, Status.OK,
                                  f"{PROFILE_ID} is ACTIVE, routes to us-east-1, us-east-2, us-west-2")


@pytest.mark.usefixtures("with_env_keys")
def test_profile_missing_fails_with_the_seed_documents_fix(moto_url: str) -> None:
    def prepare(stubber: Stubber) -> None:
        stubber.add_response("list_inference_profiles", {"inferenceProfileSummaries": [summary("us.other-v1:0")]}, {})
    profile = run_with_stub(moto_url, prepare)[PROFILE]
    assert profile.status is Status.FAIL
    assert profile.detail == f"{PROFILE_ID} is not among the 1 inference profiles visible in us-east-1"
    assert profile.fix is not None and profile.fix.startswith(f"use the inference profile id {PROFILE_ID}")
    assert "request access to Stability AI image services in the Bedrock console" in profile.fix


@pytest.mark.usefixtures("with_env_keys")
def test_listing_denied_is_a_warning_and_credentials_in_messages_are_scrubbed(moto_url: str) -> None:
    def prepare(stubber: Stubber) -> None:
        stubber.add_client_error("list_inference_profiles", "AccessDeniedException",
                                 f"key {KEY_ID} secret {SECRET} token {TOKEN} may not list", 403)
    profile = run_with_stub(moto_url, prepare)[PROFILE]
    assert profile.status is Status.WARN
    assert profile.fix == "allow bedrock:ListInferenceProfiles to run this check"
    assert profile.detail.startswith("could not list inference profiles (AccessDeniedException: key AKIA…W9ZK ")
    assert "[redacted]" in profile.detail
    assert SECRET not in profile.detail and TOKEN not in profile.detail and KEY_ID not in profile.detail


# --- rendering and the settings edge ------------------------------------------------------------


def test_render_format() -> None:
    results = [CheckResult(CREDENTIALS, Status.OK, "arn:aws:iam::123456789012:user/x"),
               CheckResult(ACCESS, Status.FAIL, "AccessDeniedException: no", fix="request access"),
               CheckResult(PROFILE, Status.WARN, "could not list"),
               CheckResult(IDENTITY, Status.SKIP, "not run: the credentials check failed")]
    assert render(results).splitlines() == [
        "ok    credentials        arn:aws:iam::123456789012:user/x",
        "FAIL  model access       AccessDeniedException: no",
        "      fix: request access",
        "WARN  inference profile  could not list",
        "skip  identity           not run: the credentials check failed",
    ]
    assert render([]) == ""


@pytest.mark.usefixtures("with_env_keys")
def test_no_credential_reaches_the_rendered_output(moto_url: str, emulator_factory: EmulatorFactory) -> None:
    text = "\n".join(render(run_checks(options(moto_url, endpoint))) for endpoint in
                     (emulator_factory().endpoint_url, emulator_factory(deny_access=True).endpoint_url))
    assert "AKIA…W9ZK" in text and "AccessDeniedException" in text
    for secret in (KEY_ID, SECRET, TOKEN, SECRET[:12], TOKEN[:12]):
        assert secret not in text
    assert "{}" not in text  # nor the probe's request body


def test_options_from_settings(write_manifest: Callable[..., Path]) -> None:
    settings = load_settings(write_manifest(backend="bedrock", bedrock={"region": "us-west-2",
                                                                         "endpoint_url": "http://127.0.0.1:9"}))
    assert options_from_settings(settings, control_endpoint_url="http://127.0.0.1:8") == DoctorOptions(
        region="us-west-2", profile=None, model_id=PROFILE_ID, base_model_id=BASE_ID,
        runtime_endpoint_url="http://127.0.0.1:9", control_endpoint_url="http://127.0.0.1:8",
        region_source="manifest", endpoint_source="manifest", connect_timeout_s=10.0,
        quota=QuotaTarget("conservative", cross_region=True))


def test_doctor_command_end_to_end(moto_url: str, emulator_factory: EmulatorFactory, with_env_keys: None,
                                   write_manifest: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    from batch_upscaler.cli import main

    emulator = emulator_factory()
    manifest = write_manifest(backend="bedrock", model={"name": "creative"})
    code = main(["doctor", str(manifest), "--endpoint-url", emulator.endpoint_url,
                 "--control-endpoint-url", moto_url])
    out = capsys.readouterr().out
    assert code == 0, out  # moto cannot list inference profiles: a warning, not a failure
    assert "ok    model access" in out and "us.stability.stable-creative-upscale-v1:0" in out
    assert "WARN  inference profile" in out
    denied = emulator_factory(deny_access=True)
    assert main(["doctor", "--model", "fast", "--endpoint-url", denied.endpoint_url,
                 "--control-endpoint-url", moto_url]) == 3
    assert "FAIL  model access" in capsys.readouterr().out


# --- the command with the AWS environment people have (a subprocess each: the CLI reads it) -----


def doctor_cli(*args: str, env: dict[str, str] | None = None, keys: bool = True) -> subprocess.CompletedProcess[str]:
    """``batch-upscaler doctor`` with the tests' dummy keys (or none), no AWS files, and ``env`` on top."""
    base = cli_env() if keys else {k: v for k, v in cli_env().items() if not k.startswith("AWS_") or
                                   k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")}
    return subprocess.run([sys.executable, "-m", "batch_upscaler", "doctor", *args], env=base | (env or {}),
                          capture_output=True, text=True, timeout=60)


def line_of(output: str, name: str) -> str:
    """The line of one check in rendered output (its fix line, if any, appended)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line[6:].startswith(name + " "):
            return line + ("\n" + lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith(" " * 6) else "")
    raise AssertionError(f"no {name} line in:\n{output}")


@pytest.mark.parametrize(("args", "env", "in_manifest"), [
    ((), {"AWS_PROFILE": "nosuch"}, False),
    (("--profile", "nosuch"), {"AWS_PROFILE": "other"}, False),
    ((), {}, True),
])
def test_a_missing_profile_is_named_wherever_it_came_from(
        write_manifest: Callable[..., Path], args: tuple[str, ...], env: dict[str, str], in_manifest: bool) -> None:
    manifest = (str(write_manifest(backend="bedrock", bedrock={"profile": "nosuch"})),) if in_manifest else ()
    done = doctor_cli(*manifest, *args, env=env)
    assert done.returncode == 3, done.stdout + done.stderr
    credentials = line_of(done.stdout, CREDENTIALS)
    assert "AWS profile 'nosuch' not found" in credentials
    assert "`aws configure --profile nosuch`" in credentials
    assert "None" not in done.stdout


def test_offline_with_only_a_bedrock_endpoint_identity_warns_and_access_is_checked(
        emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    no_sts = closed_port_url()  # nothing listens: no STS (nor bedrock control plane) is reachable
    done = doctor_cli("--endpoint-url", emulator.endpoint_url, env={"AWS_ENDPOINT_URL": no_sts})
    assert done.returncode == 0, done.stdout + done.stderr
    identity = line_of(done.stdout, IDENTITY)
    assert identity.startswith("WARN  identity"), done.stdout
    assert f"STS at {no_sts} could not be reached" in identity
    assert "the model access check" in identity
    assert line_of(done.stdout, ACCESS).startswith("ok    model access")
    [record] = emulator.records()
    assert (record.status, record.model_id) == (400, PROFILE_ID)


def test_sts_is_asked_at_the_regional_endpoint_even_with_legacy_settings(emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    offline = closed_port_url()  # a proxy that is not there: nothing leaves this machine
    env = {"AWS_STS_REGIONAL_ENDPOINTS": "legacy", "AWS_REGION": "us-west-2", "HTTPS_PROXY": offline,
           "HTTP_PROXY": offline, "NO_PROXY": "127.0.0.1"}
    done = doctor_cli("--endpoint-url", emulator.endpoint_url, env=env)
    identity = line_of(done.stdout, IDENTITY)
    assert "https://sts.us-west-2.amazonaws.com" in identity, done.stdout
    assert "sts.amazonaws.com" not in done.stdout.replace("sts.us-west-2.amazonaws.com", "")
    assert identity.startswith("WARN  identity")
    assert done.returncode == 0 and len(emulator.records()) == 1


def test_sts_honours_aws_endpoint_url_sts(moto_url: str, emulator_factory: EmulatorFactory) -> None:
    emulator = emulator_factory()
    env = {"AWS_ENDPOINT_URL_STS": moto_url, "AWS_ENDPOINT_URL": closed_port_url()}
    done = doctor_cli("--endpoint-url", emulator.endpoint_url, env=env)
    assert done.returncode == 0, done.stdout
    identity = line_of(done.stdout, IDENTITY)
    assert identity.startswith("ok    identity") and f"via {moto_url}" in identity


@pytest.mark.parametrize(("key_id", "secret"), [("test", "test"), ("AKIDTEST", "y"), ("ent", "ion")])
def test_short_dummy_keys_do_not_garble_words(moto_url: str, emulator_factory: EmulatorFactory,
                                              key_id: str, secret: str) -> None:
    emulator = emulator_factory()
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    done = doctor_cli("--endpoint-url", emulator.endpoint_url, "--control-endpoint-url", moto_url, env=env)
    assert done.returncode == 0, done.stdout
    out = done.stdout
    assert not re.search(r"\w(\[redacted\]|…)|(\[redacted\]|…)\w", out.replace("AKID…TEST", "")), out
    for phrase in ("from environment variables", "(account 123456789012)", "was authorised", "nothing was billed",
                   "identity", "validation", "region", "us-east-1, the built-in default"):
        assert phrase in out, out


def test_region_flag_without_a_prefix_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from batch_upscaler.cli import main

    assert main(["doctor", "--region", "eu-west-1"]) == 2
    err = capsys.readouterr().err
    assert "--region eu-west-1: no inference-profile prefix is known for 'eu-west-1'" in err
    assert "doctor.yaml" not in err


@pytest.mark.parametrize("how", ["environment", "flags", "manifest"])
def test_doctor_shows_the_region_and_endpoint_in_use_and_where_they_came_from(
        moto_url: str, emulator_factory: EmulatorFactory, write_manifest: Callable[..., Path], how: str) -> None:
    emulator = emulator_factory()
    url = emulator.endpoint_url
    if how == "environment":
        done = doctor_cli(env={"AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": url,
                               "AWS_ENDPOINT_URL_STS": moto_url, "AWS_ENDPOINT_URL": closed_port_url()})
        region, source, endpoint_source = "us-west-2", "AWS_REGION", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME"
    elif how == "flags":
        done = doctor_cli("--region", "us-east-2", "--endpoint-url", url, "--control-endpoint-url", moto_url,
                          env={"AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": closed_port_url()})
        region, source, endpoint_source = "us-east-2", "--region", "--endpoint-url"
    else:
        manifest = write_manifest(backend="bedrock", bedrock={"region": "us-east-2", "endpoint_url": url})
        done = doctor_cli(str(manifest), "--control-endpoint-url", moto_url, env={"AWS_DEFAULT_REGION": "us-west-2"})
        region, source, endpoint_source = "us-east-2", "manifest", "manifest"
    assert done.returncode == 0, done.stdout + done.stderr
    assert line_of(done.stdout, REGION).startswith(f"ok    region             {region}, from {source}")
    assert line_of(done.stdout, ENDPOINT).startswith(f"ok    endpoint           bedrock-runtime {url}, "
                                                     f"from {endpoint_source}")
    assert line_of(done.stdout, ACCESS).startswith("ok    model access")
    assert [r.signing_region for r in emulator.records()] == [region]


def test_doctor_shows_the_default_endpoint_without_asking_it(emulator_factory: EmulatorFactory) -> None:
    done = doctor_cli(keys=False)  # no credentials: nothing is sent anywhere
    assert done.returncode == 3
    assert line_of(done.stdout, REGION).startswith("ok    region             us-east-1, the built-in default")
    assert line_of(done.stdout, ENDPOINT).startswith("ok    endpoint           bedrock-runtime "
                                                     "https://bedrock-runtime.us-east-1.amazonaws.com, "
                                                     "the AWS default for the region")


def test_long_secrets_are_redacted_even_inside_other_text_and_short_ones_only_as_words() -> None:
    scrub = redactor([SECRET, "test"], [KEY_ID, "key"])
    text = scrub(f"x{SECRET}y id={KEY_ID}, the latest test of a keyring key; a test-only value")
    assert text == "x[redacted]y id=AKIA…W9ZK, the latest [redacted] of a keyring …; a [redacted]-only value"


@pytest.mark.usefixtures("with_env_keys")
def test_the_applied_quota_is_printed_when_it_can_be_read(moto_url: str, emulator_factory: EmulatorFactory) -> None:
    target = QuotaTarget("conservative", cross_region=True)
    published = emulator_factory(quota_rpm=750)
    results = by_name(run_checks(options(moto_url, published.endpoint_url, quota=target,
                                         quotas_endpoint_url=published.endpoint_url)))
    assert results[QUOTA].status is Status.OK
    assert results[QUOTA].detail.startswith("750 requests/min applied (Cross-Region InvokeModel requests per minute "
                                            "for Stable Image Conservative Upscale, L-")
    denied = emulator_factory(quota_rpm=750, quotas_denied=True)
    results = by_name(run_checks(options(moto_url, denied.endpoint_url, quota=target,
                                         quotas_endpoint_url=denied.endpoint_url)))
    assert results[QUOTA].status is Status.WARN and "AccessDeniedException" in results[QUOTA].detail
    assert "servicequotas:ListServiceQuotas" in (results[QUOTA].fix or "")
    unpublished = emulator_factory()
    results = by_name(run_checks(options(moto_url, unpublished.endpoint_url, quota=target,
                                         quotas_endpoint_url=unpublished.endpoint_url)))
    assert results[QUOTA].status is Status.WARN and "limits.quota_code" in (results[QUOTA].fix or "")
    assert exit_code(list(results.values())) == 0  # the quota is optional: never a failure
