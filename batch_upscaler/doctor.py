"""``batch-upscaler doctor``: check, without paying for an image, that this machine can invoke the upscaler on Bedrock.

One job: run an ordered list of read-only checks (credentials found, whose they are, region
supported and where it came from, the bedrock-runtime endpoint in use, inference profile visible,
model access granted) and say for each ``ok`` or the exact fix. A check whose prerequisite failed
is reported as ``skip`` with the reason. The CLI prints :func:`render` and exits with
:func:`exit_code` (0 when nothing failed, 3 otherwise).

STS is asked at its regional endpoint (``sts.<region>.amazonaws.com``, or wherever
``AWS_ENDPOINT_URL_STS`` / ``AWS_ENDPOINT_URL`` point: botocore reads them). Runs never call STS, so
an STS that cannot be reached (offline, a VPC with only a Bedrock endpoint) is a warning, and the
model-access check still tries the credentials on bedrock-runtime itself.

Doctor is not on the hot path, so it uses plain synchronous boto3, with botocore's retries off:
one attempt per call, so a broken endpoint fails fast and nothing is ever sent twice. Model access
is probed with ``InvokeModel`` and the empty JSON body ``{}``: Bedrock authorises the caller and then
rejects the body with a ValidationException, so no image is generated and nothing is billed.

Credentials are never printed (the key id is masked, and every line is scrubbed of the session's
keys); request bodies are never printed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ProfileNotFound
from botocore.exceptions import ConnectionError as BotoConnectionError

from batch_upscaler.quotas import SERVICE_CODE, QuotaTarget, pick
from batch_upscaler.settings import JobSettings

SUPPORTED_REGIONS = ("us-east-1", "us-east-2", "us-west-2")  # reference §1.3: the `us.` profile's regions
EXIT_OK = 0
EXIT_FAIL = 3  # the README's "fatal backend error: credentials, model access or model id"

CREDENTIALS = "credentials"
IDENTITY = "identity"
REGION = "region"
ENDPOINT = "endpoint"
PROFILE = "inference profile"
ACCESS = "model access"
QUOTA = "quota"

# Which earlier checks each check needs; a failed or skipped prerequisite skips it.
_NEEDS: Mapping[str, tuple[str, ...]] = {
    IDENTITY: (CREDENTIALS,),
    PROFILE: (CREDENTIALS, IDENTITY, REGION),
    ACCESS: (CREDENTIALS, IDENTITY, REGION),
    QUOTA: (CREDENTIALS, REGION),
}
_PROBE_BODY = b"{}"  # deliberately invalid: validated, never run, never billed
_NOT_BILLED = "no image was generated and nothing was billed"
_CREDENTIAL_SOURCES = {
    "env": "environment variables", "shared-credentials-file": "shared credentials file",
    "config-file": "AWS config file", "sso": "IAM Identity Center (SSO)", "assume-role": "assumed role",
    "custom-process": "credential_process", "iam-role": "instance role (IMDS)",
    "container-role": "container role", "explicit": "keys passed explicitly",
}
_PROFILE_SOURCES = ("shared-credentials-file", "config-file", "sso", "assume-role", "custom-process")
_AUTH_CODES = ("UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
               "ExpiredToken", "InvalidClientTokenId", "SignatureDoesNotMatch", "IncompleteSignature",
               "MissingAuthenticationTokenException")
_KEY_ID = re.compile(r"\b(AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")
# A secret this long is redacted wherever it appears; a shorter one (a dummy such as "test") only as a
# whole word, or it would garble the words that contain it.
_SECRET_IN_WORDS_MIN = 8
_LEGACY_STS_HOST = "sts.amazonaws.com"  # the global endpoint (sts_regional_endpoints = legacy)


class Status(StrEnum):
    OK = "ok"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``detail`` says what was found, ``fix`` what to do about it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorOptions:
    """What to check: the job's region, profile and model, and where the endpoints are."""

    region: str
    profile: str | None  # AWS named profile; None = the default credential chain
    model_id: str  # what the runner invokes: the inference-profile id, e.g. us.stability.…-v1:0
    base_model_id: str  # the foundation model, e.g. stability.stable-conservative-upscale-v1:0
    runtime_endpoint_url: str | None  # bedrock-runtime (InvokeModel), e.g. the emulator; None: botocore's
    control_endpoint_url: str | None  # sts and the bedrock control plane, e.g. a moto server; None: botocore's
    region_source: str = "default"  # where the region came from (--region, manifest, AWS_REGION, ...)
    endpoint_source: str | None = None  # where the runtime endpoint came from (--endpoint-url, AWS_ENDPOINT_URL, ...)
    supported_regions: tuple[str, ...] = SUPPORTED_REGIONS
    profile_prefix: str = "us"  # the inference-profile prefix the Stability upscalers exist under
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    quota: QuotaTarget | None = None  # set: also read the model's applied RPM quota from Service Quotas
    quotas_endpoint_url: str | None = None  # Service Quotas; None: the control endpoint, else botocore's

    @property
    def suggested_model_id(self) -> str:
        return f"{self.profile_prefix}.{self.base_model_id}"


def options_from_settings(settings: JobSettings, *, control_endpoint_url: str | None = None) -> DoctorOptions:
    """The doctor options for a job (its ``bedrock.endpoint_url`` is the runtime endpoint)."""
    return DoctorOptions(
        region=settings.region, profile=settings.profile, model_id=settings.model_id,
        base_model_id=settings.model.base_id, runtime_endpoint_url=settings.endpoint_url,
        control_endpoint_url=control_endpoint_url, region_source=settings.aws.region,
        endpoint_source=settings.aws.endpoint, connect_timeout_s=settings.limits.connect_timeout_s,
        quota=QuotaTarget.of(settings), quotas_endpoint_url=settings.quotas_endpoint_url,
    )


def _guarded(name: str, step: Callable[[], CheckResult]) -> CheckResult:
    """A check that breaks in an unforeseen way (an endpoint that is not AWS, say) is a FAIL, not a crash."""
    try:
        return step()
    except Exception as exc:  # botocore's ResponseParserError, for one, is no BotoCoreError
        return CheckResult(name, Status.FAIL, f"{type(exc).__name__}: {exc}",
                           "check the endpoint URL and the network; rerun with -v for details")


def run_checks(options: DoctorOptions, session: boto3.session.Session | None = None) -> list[CheckResult]:
    """Every check, in order; a check whose prerequisite did not pass is skipped with the reason."""
    opened = _open_session(options, session)
    steps: list[tuple[str, Callable[[], CheckResult]]] = [
        (CREDENTIALS, lambda: check_credentials(opened)),
        (IDENTITY, lambda: check_identity(_usable(opened), options)),
        (REGION, lambda: check_region(options)),
        (ENDPOINT, lambda: check_endpoint(opened, options)),
        (PROFILE, lambda: check_inference_profile(_usable(opened), options)),
        (ACCESS, lambda: check_model_access(_usable(opened), options)),
    ]
    if options.quota is not None:
        steps.append((QUOTA, lambda: check_quota(_usable(opened), options)))
    done: dict[str, CheckResult] = {}
    for name, step in steps:
        blocker = _blocker(name, done)
        done[name] = CheckResult(name, Status.SKIP, blocker) if blocker else _guarded(name, step)
    scrub = _scrubber(opened)
    return [CheckResult(r.name, r.status, scrub(r.detail), scrub(r.fix) if r.fix else None) for r in done.values()]


def render(results: Sequence[CheckResult]) -> str:
    """One line per check (status, name, detail), and an indented ``fix:`` line under each that has one."""
    width = max((len(r.name) for r in results), default=0) + 2
    lines: list[str] = []
    for result in results:
        label = "ok" if result.status is Status.OK else result.status.value
        label = label if result.status in (Status.OK, Status.SKIP) else label.upper()
        lines.append(f"{label:<6}{result.name:<{width}}{result.detail}".rstrip())
        if result.fix:
            lines.append(f"{'':6}fix: {result.fix}")
    return "\n".join(lines)


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when every check passed or only warned (or was skipped behind a warning), 3 when any failed."""
    return EXIT_FAIL if any(r.status is Status.FAIL for r in results) else EXIT_OK


# --- the checks -------------------------------------------------------------------------------


def check_credentials(opened: boto3.session.Session | CheckResult) -> CheckResult:
    """Credentials are found, and where they come from (the key id masked, the secret never shown)."""
    if isinstance(opened, CheckResult):
        return opened
    try:
        credentials = opened.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except (BotoCoreError, ClientError) as exc:
        return CheckResult(CREDENTIALS, Status.FAIL, f"credentials could not be loaded ({_describe(exc)})",
                           fix=_refresh_fix(opened.profile_name))
    if frozen is None or not frozen.access_key:
        return CheckResult(CREDENTIALS, Status.FAIL, "no AWS credentials found", fix=_no_credentials_fix())
    temporary = ", temporary (session token)" if frozen.token else ""
    where = _credential_source(str(credentials.method), str(opened.profile_name))
    return CheckResult(CREDENTIALS, Status.OK, f"from {where}, key {mask(str(frozen.access_key))}{temporary}")


def check_identity(session: boto3.session.Session, options: DoctorOptions) -> CheckResult:
    """Whose credentials these are: ``sts get-caller-identity``, at the regional STS endpoint."""
    where = options.control_endpoint_url or "the STS endpoint"
    try:
        client = _sts_client(session, options)
        where = str(client.meta.endpoint_url)
        answer = client.get_caller_identity()
    except ClientError as exc:
        code = _code(exc)
        fix = (_refresh_fix(str(session.profile_name)) if "Expired" in code else
               "the credentials were rejected: check the access key in IAM (is it active?) and run `aws configure`")
        return CheckResult(IDENTITY, Status.FAIL, _describe(exc), fix=fix)
    except (BotoConnectionError, HTTPClientError) as exc:
        return _sts_unreachable(where, exc)
    except (BotoCoreError, ValueError) as exc:
        return CheckResult(IDENTITY, Status.FAIL, _describe(exc), fix=_network_fix(exc, "the STS endpoint"))
    return CheckResult(IDENTITY, Status.OK,
                       f"{answer.get('Arn', '?')} (account {answer.get('Account', '?')}) via {where}")


def _sts_unreachable(where: str, exc: Exception) -> CheckResult:
    """Runs never call STS: one that cannot be reached leaves the identity unconfirmed, nothing more."""
    return CheckResult(IDENTITY, Status.WARN, f"STS at {where} could not be reached ({_describe(exc)}), so whose "
                       "credentials these are is not confirmed; the model access check tries them on bedrock-runtime",
                       fix=f"runs do not need STS; for this check allow access to {where}, or point "
                           "AWS_ENDPOINT_URL_STS (or --control-endpoint-url) at an STS VPC endpoint")


def check_region(options: DoctorOptions) -> CheckResult:
    """The region serves the Stability upscalers (through the ``us.`` cross-region inference profile)."""
    regions = ", ".join(options.supported_regions)
    source = _from(options.region_source, "the built-in default")
    if options.region in options.supported_regions:
        return CheckResult(REGION, Status.OK, f"{options.region}, {source} (the models are served in {regions})")
    return CheckResult(REGION, Status.FAIL,
                       f"{options.region}, {source}: the Stability upscale models are only served in {regions}",
                       fix=f"set bedrock.region (or --region) to one of {regions}")


def check_endpoint(opened: boto3.session.Session | CheckResult, options: DoctorOptions) -> CheckResult:
    """Where InvokeModel goes and why: the endpoint botocore resolves for bedrock-runtime (nothing is sent)."""
    if isinstance(opened, CheckResult):  # no session: show what the configuration says
        url = options.runtime_endpoint_url or f"https://bedrock-runtime.{options.region}.amazonaws.com"
    else:
        # Resolving an endpoint needs no credentials: stand-in keys keep the credential chain (and
        # the instance metadata service) out of it. This client never sends anything.
        client = _client(opened, "bedrock-runtime", options, options.runtime_endpoint_url,
                         aws_access_key_id="unused", aws_secret_access_key="unused")
        url = str(client.meta.endpoint_url)
    source = options.endpoint_source or ("configured" if options.runtime_endpoint_url else "default")
    if source == "default" and urlsplit(url).hostname != f"bedrock-runtime.{options.region}.amazonaws.com":
        source = "the AWS config file or SDK settings"  # botocore resolved another (endpoint_url, FIPS, ...)
    how = "configured" if source == "configured" else _from(source, "the AWS default for the region")
    return CheckResult(ENDPOINT, Status.OK, f"bedrock-runtime {url}, {how}")


def _from(source: str, default: str) -> str:
    return default if source == "default" else f"from {source}"


def check_inference_profile(session: boto3.session.Session, options: DoctorOptions) -> CheckResult:
    """The model id is among the inference profiles visible to the caller (``bedrock list-inference-profiles``)."""
    try:
        client = _client(session, "bedrock", options, options.control_endpoint_url)
        profiles = _list_profiles(client)
    except (ClientError, BotoCoreError, ValueError) as exc:
        fix = ("allow bedrock:ListInferenceProfiles to run this check" if _code(exc) == "AccessDeniedException"
               else f"check by hand: `aws bedrock list-inference-profiles --region {options.region}`")
        return CheckResult(PROFILE, Status.WARN, f"could not list inference profiles ({_describe(exc)}); "
                           "the model access check does not depend on this", fix=fix)
    found = next((p for p in profiles if options.model_id in (p.get("inferenceProfileId"),
                                                               p.get("inferenceProfileArn"))), None)
    if found is None:
        return CheckResult(PROFILE, Status.FAIL, f"{options.model_id} is not among the {len(profiles)} "
                           f"inference profiles visible in {options.region}", fix=_profile_fix(options))
    status = str(found.get("status", "?"))
    regions = sorted({str(m.get("modelArn", "")).split(":")[3] for m in found.get("models", [])
                      if str(m.get("modelArn", "")).count(":") >= 4})
    detail = f"{options.model_id} is {status}, routes to {', '.join(regions) or '?'}"
    if status != "ACTIVE":
        return CheckResult(PROFILE, Status.WARN, detail, fix="wait until the profile is ACTIVE, or ask AWS support")
    return CheckResult(PROFILE, Status.OK, detail)


def check_model_access(session: boto3.session.Session, options: DoctorOptions) -> CheckResult:
    """Access is granted, checked on the invoke path without paying: InvokeModel with the body ``{}``."""
    try:
        client = _client(session, "bedrock-runtime", options, options.runtime_endpoint_url)
        response = client.invoke_model(modelId=options.model_id, body=_PROBE_BODY,
                                       contentType="application/json", accept="application/json")
    except ClientError as exc:
        return _invoke_error(exc, options)
    except (BotoCoreError, ValueError) as exc:
        where = "the bedrock-runtime endpoint (bedrock.endpoint_url / --endpoint-url)"
        return CheckResult(ACCESS, Status.FAIL, f"InvokeModel could not be sent ({_describe(exc)})",
                           fix=_network_fix(exc, where))
    response["body"].close()
    return CheckResult(ACCESS, Status.WARN, f"InvokeModel on {options.model_id} accepted an empty body: access "
                       "works, but this endpoint does not validate requests the way Bedrock does")


def check_quota(session: boto3.session.Session, options: DoctorOptions) -> CheckResult:
    """The model's applied requests-per-minute quota, read from Service Quotas (``auto`` starts from it)."""
    assert options.quota is not None
    target = options.quota
    try:
        where = options.quotas_endpoint_url or options.control_endpoint_url
        client = _client(session, "service-quotas", options, where)
        if target.code:
            found = pick([client.get_service_quota(ServiceCode=SERVICE_CODE, QuotaCode=target.code)["Quota"]], target)
        else:
            pages = client.get_paginator("list_service_quotas").paginate(ServiceCode=SERVICE_CODE)
            found = next((q for page in pages if (q := pick(page.get("Quotas", []), target))), None)
    except (ClientError, BotoCoreError, ValueError) as exc:
        fix = ("allow servicequotas:ListServiceQuotas and servicequotas:GetServiceQuota (optional: "
               "requests_per_minute: auto then starts at the quota)" if _code(exc) == "AccessDeniedException"
               else f"check by hand: `aws service-quotas list-service-quotas --service-code bedrock "
                    f"--region {options.region}`")
        return CheckResult(QUOTA, Status.WARN, f"could not read the applied quota ({_describe(exc)})", fix=fix)
    if found is None:
        wanted = f"code {target.code}" if target.code else f"'{target.kind} … {target.model_word} … upscale'"
        return CheckResult(QUOTA, Status.WARN, f"Service Quotas lists no {wanted} in {options.region}",
                           fix="set limits.quota_code to the quota's code (see README, 'Rate')")
    return CheckResult(QUOTA, Status.OK, f"{found.rpm:g} requests/min applied ({found.name}, {found.code})")


# --- InvokeModel answers -----------------------------------------------------------------------


def _invoke_error(exc: ClientError, options: DoctorOptions) -> CheckResult:
    code, message = _code(exc), _message(exc)
    seen = f"{code}: {message}"
    if code == "ValidationException":
        return _invoke_validation(seen, options)
    if code == "AccessDeniedException":
        return CheckResult(ACCESS, Status.FAIL, seen, fix=_access_fix(options))
    if code == "ResourceNotFoundException":
        return CheckResult(ACCESS, Status.FAIL, seen, fix=_profile_fix(options))
    if code in _AUTH_CODES:
        return CheckResult(ACCESS, Status.FAIL, seen, fix="the credentials were rejected by bedrock-runtime: "
                           "check the access key (and session token) and run `aws configure`")
    if code == "ThrottlingException":
        return CheckResult(ACCESS, Status.WARN, f"{seen} (throttled, not denied: access is probably granted)",
                           fix="run doctor again when no job is using the quota")
    return CheckResult(ACCESS, Status.WARN, f"could not confirm model access ({seen})",
                       fix="run doctor again in a few minutes; if it persists, check the AWS Health Dashboard")


def _invoke_validation(seen: str, options: DoctorOptions) -> CheckResult:
    lowered = seen.lower()
    if "on-demand throughput" in lowered:
        return CheckResult(ACCESS, Status.FAIL, seen, fix=f"use the inference profile id {options.suggested_model_id}"
                           f" instead of the bare model id {options.base_model_id}")
    if "model identifier is invalid" in lowered:
        return CheckResult(ACCESS, Status.FAIL, seen, fix=_profile_fix(options))
    if "malformed input request" in lowered or "required key" in lowered:
        return CheckResult(ACCESS, Status.OK, f"InvokeModel on {options.model_id} was authorised and its empty probe "
                           f"body was rejected by validation ({seen}); {_NOT_BILLED}")
    return CheckResult(ACCESS, Status.WARN, f"{seen}: not the expected rejection of an empty body, so access "
                       f"is not confirmed; {_NOT_BILLED}",
                       fix=f"check the model id (expected {options.suggested_model_id})")


# --- fixes --------------------------------------------------------------------------------------


def _no_credentials_fix() -> str:
    return ("configure AWS credentials: `aws configure` (or `aws configure --profile NAME` and set bedrock.profile), "
            "`aws sso login --profile NAME`, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
            "or try the job locally with backend: emulator")


def _refresh_fix(profile: str | None) -> str:
    name = f" --profile {profile}" if profile and profile != "default" else ""
    return f"refresh the credentials (`aws sso login{name}`, or new temporary keys) and check the profile's settings"


def _profile_fix(options: DoctorOptions) -> str:
    regions = ", ".join(options.supported_regions)
    return (f"use the inference profile id {options.suggested_model_id} (not the bare model id) in one of {regions}, "
            "and request access to Stability AI image services in the Bedrock console (Model access)")


def _access_fix(options: DoctorOptions) -> str:
    regions = ", ".join(options.supported_regions)
    return ("request access to Stability AI image services in the Bedrock console (Model access) / check that IAM "
            f"allows bedrock:InvokeModel on the inference profile {options.model_id} and on the foundation model "
            f"ARNs arn:aws:bedrock:REGION::foundation-model/{options.base_model_id} in all three regions ({regions})")


def _network_fix(exc: Exception, what: str) -> str:
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return f"cannot reach {what}: check the URL, proxy settings (HTTPS_PROXY), firewall or VPC endpoint"
    return f"check the configuration of {what}"


# --- plumbing -----------------------------------------------------------------------------------


def _open_session(options: DoctorOptions,
                  session: boto3.session.Session | None) -> boto3.session.Session | CheckResult:
    """The session to use, or the credentials FAIL when its named profile does not exist."""
    if session is not None:
        return session
    try:
        return boto3.session.Session(profile_name=options.profile, region_name=options.region)
    except ProfileNotFound as exc:  # the profile botocore looked for: --profile, bedrock.profile or AWS_PROFILE
        name = exc.kwargs.get("profile") or options.profile
        return CheckResult(CREDENTIALS, Status.FAIL, f"AWS profile {name!r} not found",
                           fix=f"create it with `aws configure --profile {name}`, or set bedrock.profile "
                               "(or --profile, or AWS_PROFILE) to an existing profile; unset, the default "
                               "credential chain is used")


def _usable(opened: boto3.session.Session | CheckResult) -> boto3.session.Session:
    if isinstance(opened, CheckResult):  # never reached: the checks that need a session are skipped
        raise RuntimeError("no AWS session")
    return opened


def _blocker(name: str, done: Mapping[str, CheckResult]) -> str | None:
    for need in _NEEDS.get(name, ()):
        earlier = done[need]
        if earlier.status is Status.FAIL:
            return f"not run: the {need} check failed"
        if earlier.status is Status.SKIP:
            return earlier.detail
    return None


def _client(session: boto3.session.Session, service: str, options: DoctorOptions, endpoint_url: str | None,
            **keys: str) -> Any:
    """A client with one attempt per call; ``endpoint_url`` None lets botocore resolve it (AWS_ENDPOINT_URL_*)."""
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, user_agent_extra="batch-upscaler-doctor",
                    connect_timeout=options.connect_timeout_s, read_timeout=options.read_timeout_s)
    return session.client(service, region_name=options.region, endpoint_url=endpoint_url, config=config, **keys)


def _sts_client(session: boto3.session.Session, options: DoctorOptions) -> Any:
    """STS at the configured endpoint, else the regional one, even where ``sts_regional_endpoints = legacy``
    would pick the global endpoint (which networks with only regional or VPC endpoints cannot reach)."""
    client = _client(session, "sts", options, options.control_endpoint_url)
    if options.control_endpoint_url is None and urlsplit(str(client.meta.endpoint_url)).hostname == _LEGACY_STS_HOST:
        client = _client(session, "sts", options, f"https://sts.{options.region}.amazonaws.com")
    return client


def _list_profiles(client: Any, max_pages: int = 50) -> list[Mapping[str, Any]]:
    profiles: list[Mapping[str, Any]] = []
    token: str | None = None
    for _ in range(max_pages):
        page = client.list_inference_profiles(**({"nextToken": token} if token else {}))
        profiles += page.get("inferenceProfileSummaries", [])
        token = page.get("nextToken")
        if not token:
            break
    return profiles


def _credential_source(method: str, profile: str) -> str:
    where = _CREDENTIAL_SOURCES.get(method, method)
    return f"{where}, profile {profile}" if method in _PROFILE_SOURCES else where


def mask(key_id: str) -> str:
    """``AKIA…WXYZ``: enough to tell keys apart, not enough to use one."""
    return f"{key_id[:4]}…{key_id[-4:]}" if len(key_id) >= 16 else "…"


def _scrubber(opened: boto3.session.Session | CheckResult) -> Callable[[str], str]:
    """Removes the session's key id, secret and token (and anything shaped like a key id) from a text."""
    secrets: list[str] = []  # the secret and token: replaced whole
    key_ids: list[str] = []
    if not isinstance(opened, CheckResult):
        try:
            credentials = opened.get_credentials()
            frozen = credentials.get_frozen_credentials() if credentials is not None else None
        except (BotoCoreError, ClientError):
            frozen = None
        if frozen is not None:
            secrets = [str(s) for s in (frozen.secret_key, frozen.token) if s]
            key_ids = [str(frozen.access_key)] if frozen.access_key else []

    return redactor(secrets, key_ids)


def redactor(secrets: Sequence[str], key_ids: Sequence[str]) -> Callable[[str], str]:
    """Replaces each secret with ``[redacted]`` and each key id with its mask, then anything shaped
    like a key id. A value shorter than 8 characters (a dummy key such as ``test``) is replaced only
    where it is a whole word, so the words that contain it stay readable."""
    rules = [(_secret_pattern(s), "[redacted]") for s in secrets if s]
    rules += [(_secret_pattern(k), mask(k).replace("\\", "\\\\")) for k in key_ids if k]  # a literal template

    def scrub(text: str) -> str:
        for pattern, replacement in rules:
            text = pattern.sub(replacement, text)
        return _KEY_ID.sub(lambda m: mask(m.group(0)), text)
    return scrub


def _secret_pattern(secret: str) -> re.Pattern[str]:
    escaped = re.escape(secret)
    return re.compile(escaped if len(secret) >= _SECRET_IN_WORDS_MIN else rf"(?<!\w){escaped}(?!\w)")


def _code(exc: Exception) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown")) if isinstance(exc, ClientError) else ""


def _message(exc: ClientError) -> str:
    message = str(exc.response.get("Error", {}).get("Message", ""))
    if message.lstrip().startswith("<"):
        return "the endpoint answered with an HTML error page, not an AWS API response"
    return _one_line(message)


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        code = _code(exc)
        return f"{'HTTP ' if code.isdigit() else ''}{code}: {_message(exc)}"
    return f"{type(exc).__name__}: {_one_line(str(exc))}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_storage(settings: JobSettings, session: boto3.session.Session | None = None) -> list[CheckResult]:
    """The job's S3 checks (buckets, sources readable, output and report writable), each failure with
    the exact IAM actions missing; none when the job uses no S3."""
    from batch_upscaler.storage.s3_checks import check_s3, s3_client, s3_locations

    if not s3_locations(settings):
        return []
    try:
        session = session or boto3.session.Session(profile_name=settings.s3.profile or settings.profile)
    except ProfileNotFound as exc:
        return [CheckResult("s3", Status.FAIL, f"AWS profile {exc.kwargs.get('profile')!r} not found")]
    findings = check_s3(settings, s3_client(session, settings))
    scrub = _scrubber(session)
    return [CheckResult(scrub(f.name), Status(f.status), scrub(f.detail), f.fix) for f in findings]
