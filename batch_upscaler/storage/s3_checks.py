"""``doctor``'s S3 checks: the job's buckets exist and are reachable, its sources can be listed and read,
its output and report prefixes can be written — and, for what cannot, the exact IAM actions missing.

Synchronous boto3 (doctor is not on the hot path), one attempt per call. The output check puts a
zero-byte probe object and deletes it again; a run needs only s3:PutObject there (its own write
probe rewrites the job's marker object), so a refused delete is a warning, not a failure.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.urls import S3Url, is_s3, parse_s3

_DENIED = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")
_MISSING = ("NoSuchBucket", "404", "NotFound")


@dataclass(frozen=True)
class S3Finding:
    """One check's outcome: status is ``ok``, ``warn`` or ``fail``; ``missing`` the IAM actions lacking."""

    name: str
    status: str
    detail: str
    missing: tuple[str, ...] = ()
    resource: str = ""  # the ARN the missing actions are needed on

    @property
    def fix(self) -> str | None:
        return f"grant {', '.join(self.missing)} on {self.resource}" if self.missing else None


def s3_locations(settings: JobSettings) -> list[tuple[str, S3Url]]:
    """(role, URL) of every S3 location of the job: sources, output, report."""
    found = [("source", parse_s3(s)) for s in settings.sources if is_s3(s)]
    found += [(role, url) for role, url in (("output", settings.output_dir), ("report", settings.report_dir))
              if isinstance(url, S3Url)]
    return found


def check_s3(settings: JobSettings, client: Any) -> list[S3Finding]:
    """Every S3 check of the job, in order (buckets first; a missing bucket skips its prefix checks)."""
    findings: list[S3Finding] = []
    buckets_ok: dict[str, bool] = {}
    for role, url in s3_locations(settings):
        if url.bucket not in buckets_ok:
            finding = _bucket(client, url.bucket)
            buckets_ok[url.bucket] = finding.status == "ok"
            findings.append(finding)
        if buckets_ok[url.bucket]:
            findings.append(_source(client, url) if role == "source" else _writable(client, url, role))
    return findings


def _call(step: Callable[[], Any]) -> tuple[str | None, str]:
    """(error code or None, message) of one S3 call."""
    try:
        step()
    except ClientError as exc:
        return str(exc.response.get("Error", {}).get("Code", "")), str(exc)
    except BotoCoreError as exc:
        return type(exc).__name__, str(exc)
    return None, ""


def _bucket(client: Any, bucket: str) -> S3Finding:
    code, message = _call(lambda: client.head_bucket(Bucket=bucket))
    name = f"s3 bucket {bucket}"
    if code is None:
        return S3Finding(name, "ok", "exists and is reachable with these credentials")
    if code in _MISSING:
        return S3Finding(name, "fail", f"does not exist (or is in another account): {message}")
    if code in _DENIED:
        return S3Finding(name, "fail", "exists but these credentials may not use it", ("s3:ListBucket",),
                         f"arn:aws:s3:::{bucket}")
    return S3Finding(name, "fail", f"unreachable: {message}")


def _source(client: Any, url: S3Url) -> S3Finding:
    prefix, _ = url.split_glob()
    name = f"s3 source {url}"
    listed: dict[str, Any] = {}
    code, message = _call(lambda: listed.update(client.list_objects_v2(Bucket=url.bucket, Prefix=prefix,
                                                                        MaxKeys=1)))
    if code is not None:
        missing = ("s3:ListBucket",) if code in _DENIED else ()
        return S3Finding(name, "fail", f"cannot be listed: {message}", missing, f"arn:aws:s3:::{url.bucket}")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    if not keys:
        return S3Finding(name, "warn", "can be listed, but holds no object yet")
    code, message = _call(lambda: client.get_object(Bucket=url.bucket, Key=keys[0], Range="bytes=0-0"))
    if code is not None:
        return S3Finding(name, "fail", f"listed, but {keys[0]} cannot be read: {message}",
                         ("s3:GetObject",) if code in _DENIED else (), f"arn:aws:s3:::{url.bucket}/{prefix}*")
    return S3Finding(name, "ok", "can be listed and read")


def _writable(client: Any, url: S3Url, role: str) -> S3Finding:
    prefix = url.key if not url.key or url.key.endswith("/") else url.key + "/"
    key = f"{prefix}.batch-upscaler-doctor-{secrets.token_hex(4)}"
    name = f"s3 {role} {url}"
    code, message = _call(lambda: client.put_object(Bucket=url.bucket, Key=key, Body=b""))
    if code is not None:
        return S3Finding(name, "fail", f"cannot be written: {message}", ("s3:PutObject",) if code in _DENIED else (),
                         f"arn:aws:s3:::{url.bucket}/{prefix}*")
    needs_read = ("s3:GetObject", "s3:ListBucket") if role == "output" else ()
    code, message = _call(lambda: client.delete_object(Bucket=url.bucket, Key=key))
    if code is not None:
        return S3Finding(name, "warn", f"can be written; the probe object {key} could not be deleted ({message}); "
                         "runs do not need s3:DeleteObject", ())
    detail = "can be written (a zero-byte probe was put and deleted)"
    if needs_read:
        detail += "; runs also read it back (s3:GetObject, s3:ListBucket) for de-duplication and proof of work"
    return S3Finding(name, "ok", detail)


def s3_client(session: Any, settings: JobSettings, connect_timeout_s: float = 10.0) -> Any:
    """doctor's S3 client: the job's endpoint (or botocore's, from AWS_ENDPOINT_URL_S3), one attempt."""
    config = Config(retries={"total_max_attempts": 1}, connect_timeout=connect_timeout_s, read_timeout=30,
                    request_checksum_calculation=settings.s3.checksums,
                    response_checksum_validation=settings.s3.checksums)
    return session.client("s3", region_name=settings.s3.region or settings.region,
                          endpoint_url=settings.s3.endpoint_url, config=config)
