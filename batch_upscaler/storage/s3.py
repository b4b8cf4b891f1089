"""S3 at the storage edge: listing and reading sources, outputs that carry their own proof of work,
reports uploaded to a prefix — on aiobotocore, in the run's one AWS session.

* :class:`S3Access` holds the run's S3 clients (one per bucket region, found with HeadBucket's
  ``x-amz-bucket-region`` unless ``s3.region`` or an endpoint says otherwise), retries throttling,
  5xx and connection errors with back-off (and counts them), and turns AccessDenied / NoSuchBucket
  into a fatal error naming the bucket and the missing IAM action (exit 3, before any InvokeModel).
* Sources are listed with ListObjectsV2 a page at a time and probed with ranged GETs of their first
  and last bytes; an unchanged key (same size and ETag) costs no GET at all on a later run.
  Reading for sending uses ``If-Match`` with the scanned ETag, so a changed object is
  ``source_changed``, a deleted one ``source_unreadable``.
* Outputs are single PutObjects (atomic: an object is there whole or not at all) with the right
  Content-Type, botocore's flexible checksum, and user metadata that makes each object its own
  proof of work: the source, its ETag and content hash, the parameter fingerprint, the output's
  digest and the tool version. The output prefix is listed once per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import random
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from batch_upscaler.catalogue import Rejection
from batch_upscaler.discovery import Found, accepts
from batch_upscaler.errors import FatalBackendError, UsageError
from batch_upscaler.imagecheck import NeedsWholeFile, StructureError, check_ends, check_input
from batch_upscaler.probe import SENDABLE_AS_IS, Disposition, ProbeError, Refusal, read_header
from batch_upscaler.settings import S3Settings
from batch_upscaler.storage.base import (
    FileParts,
    ItemRef,
    OutputNote,
    OutputPathError,
    Probed,
    Proof,
    SourceError,
    Written,
    owner_problem,
)
from batch_upscaler.storage.local import LocalOutputStore
from batch_upscaler.storage.staging import Offload, StagedFile, StagingFileSink
from batch_upscaler.storage.urls import S3Url, key_problem, parse_s3

log = logging.getLogger(__name__)
HEAD_BYTES = 1 << 16  # the first range read of a new object: enough for the header of most images
TAIL_BYTES = 1 << 20  # the last range: where a JPEG's end-of-image marker is
OWNER_KEY = ".batch-upscaler-job.json"
_ATTEMPTS = 5
PART_BYTES = 8 * 1024 * 1024  # a staged output above this is uploaded in parts of this size (S3's minimum is 5 MiB)
_RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                          "ServiceUnavailable", "RequestTimeTooSkewed"})
_MISSING_BUCKET = frozenset({"NoSuchBucket", "404", "NotFound"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                  ".json": "application/json", ".md": "text/markdown; charset=utf-8", ".csv": "text/csv; charset=utf-8",
                  ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                  ".prom": "text/plain; version=0.0.4"}


class S3Access:
    """The S3 clients of one run and the calls made through them (retried, counted, errors named)."""

    def __init__(self, session: AioSession, settings: S3Settings, stack: AsyncExitStack, *,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self._session, self._settings, self._stack, self._sleep = session, settings, stack, sleep
        self._clients: dict[str | None, Any] = {}
        self._regions: dict[str, str | None] = {}
        self.calls = 0
        self.retries = 0

    async def _client_for(self, region: str | None) -> Any:
        if region not in self._clients:
            config = AioConfig(retries={"total_max_attempts": 1}, max_pool_connections=64,
                               request_checksum_calculation=self._settings.checksums,
                               response_checksum_validation=self._settings.checksums)
            self._clients[region] = await self._stack.enter_async_context(self._session.create_client(
                "s3", region_name=region, endpoint_url=self._settings.endpoint_url, config=config))
        return self._clients[region]

    async def client(self, bucket: str) -> Any:
        """The client for ``bucket``'s own region (asked once per bucket), unless configured."""
        if self._settings.region or self._settings.endpoint_url:
            return await self._client_for(self._settings.region)
        if bucket not in self._regions:
            self._regions[bucket] = await self._bucket_region(bucket)
        return await self._client_for(self._regions[bucket])

    async def _bucket_region(self, bucket: str) -> str | None:
        default = await self._client_for(None)
        try:
            response = await default.head_bucket(Bucket=bucket)
            headers = response["ResponseMetadata"]["HTTPHeaders"]
        except ClientError as exc:  # a 301/403 still says where the bucket lives
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        except BotoCoreError:
            return None
        region = headers.get("x-amz-bucket-region")
        return str(region) if region else None

    async def call(self, bucket: str, action: str, operation: str, **params: Any) -> Any:
        """One S3 operation, retried with back-off on throttling, 5xx and connection errors.

        AccessDenied and NoSuchBucket are fatal (exit 3) with the bucket and the IAM action named;
        other client errors (NoSuchKey, PreconditionFailed, ...) are the caller's to interpret.
        """
        client = await self.client(bucket)
        for attempt in range(1, _ATTEMPTS + 1):
            self.calls += 1
            try:
                return await getattr(client, operation)(Bucket=bucket, **params)
            except ClientError as exc:
                code = _code(exc)
                if code in _DENIED:
                    raise FatalBackendError(f"S3 {code}: {action} on {_arn(bucket, params.get('Key'))} was "
                                            f"refused; the credentials need {action}") from None
                if code in _MISSING_BUCKET and operation in ("list_objects_v2", "head_bucket", "put_object"):
                    raise FatalBackendError(f"S3 bucket {bucket!r} does not exist (or is not visible to "
                                            "these credentials)") from None
                if (code not in _RETRY_CODES and _status(exc) < 500) or attempt == _ATTEMPTS:
                    raise
            except (BotoCoreError, OSError):
                if attempt == _ATTEMPTS:
                    raise
            self.retries += 1
            await self._sleep(min(10.0, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    async def entries(self, bucket: str, prefix: str) -> AsyncIterator[Mapping[str, Any]]:
        """Every object below ``prefix`` as ListObjectsV2 describes it, a page (1,000 keys) at a time."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = await self.call(bucket, "s3:ListBucket", "list_objects_v2", **params)
            for entry in page.get("Contents", ()):
                yield entry
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _arn(bucket: str, key: str | None) -> str:
    return f"arn:aws:s3:::{bucket}" + (f"/{key}" if key else "")


# ---- sources ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Root:
    """One manifest source in S3: a prefix (every image below it), one object, or a glob under a prefix."""

    spec: str
    url: S3Url

    def display(self, relpath: str) -> str:
        return str(self.url.child(relpath)) if self.listing()[0].endswith("/") or not self.url.key else str(self.url)

    def listing(self) -> tuple[str, str | None]:
        """(ListObjectsV2 prefix, glob below it): a key without a glob and without a trailing ``/``
        is a folder (``photos/2019`` lists ``photos/2019/…``) unless it names one object."""
        prefix, pattern = self.url.split_glob()
        return prefix, pattern


async def list_found(access: S3Access, root: S3Root, exclude: Iterable[str]) -> AsyncIterator[Found]:
    """Every image object below ``root``, a page at a time (1,000 keys: memory stays flat)."""
    prefix, pattern = root.listing()
    bucket, excludes = root.url.bucket, tuple(exclude)
    async for entry in access.entries(bucket, prefix):
        found = _found(root, bucket, prefix, entry, pattern, excludes)
        if found is not None:
            yield found


def _found(root: S3Root, bucket: str, prefix: str, entry: Mapping[str, Any], pattern: str | None,
           excludes: tuple[str, ...]) -> Found | None:
    key = str(entry["Key"])
    if key.endswith("/"):
        return None  # a folder marker, not an item
    if prefix and not prefix.endswith("/") and pattern is None:
        if key == prefix:
            relpath = key.rsplit("/", 1)[-1]  # the source names this one object
        elif key.startswith(prefix + "/"):
            relpath = key[len(prefix) + 1:]  # the source names a folder without its trailing slash
        else:
            return None  # photos/2019 must not pick up photos/2019-backup/...
    else:
        relpath = key[len(prefix):]
    if not accepts(relpath, pattern, excludes, also=(key,)):
        return None
    etag = str(entry.get("ETag", "")).strip('"')
    return Found(root.spec, relpath, None, int(entry["Size"]), 0, etag=etag, url=f"s3://{bucket}/{key}")


class S3SourceReader:
    """Bytes of S3 source objects: two ranged GETs to probe, one If-Match GET to send."""

    def __init__(self, access: S3Access) -> None:
        self.access = access

    async def _get(self, item: ItemRef, byte_range: str | None = None) -> bytes:
        url = parse_s3(item.key)
        params: dict[str, Any] = {"Key": url.key, **({"IfMatch": item.etag} if item.etag else {})}
        if byte_range:
            params["Range"] = byte_range
        try:
            response = await self.access.call(url.bucket, "s3:GetObject", "get_object", **params)
            async with response["Body"] as body:
                return bytes(await body.read())
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412"):
                raise SourceError("source_changed", "the object changed after it was listed; the next run "
                                  "redoes it") from None
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise SourceError("source_unreadable", "the object was deleted after it was listed") from None
            raise SourceError("source_unreadable", f"{_code(exc)}: {exc}") from None
        except (BotoCoreError, OSError) as exc:
            raise SourceError("source_unreadable", f"{type(exc).__name__}: {exc}") from None

    async def probe(self, item: ItemRef) -> Probed:
        try:
            head = await self._get(item, f"bytes=0-{HEAD_BYTES - 1}") if item.size else b""
            header = await self._header(item, head)
            if header.pil_format in SENDABLE_AS_IS:
                await self._check_structure(item, head)
        except ProbeError as exc:
            return Probed(None, exc.refusal)
        except StructureError as exc:
            return Probed(None, Refusal(Disposition.FAIL, Rejection("truncated", str(exc))))
        except SourceError as exc:
            return Probed(None, Refusal(Disposition.FAIL, Rejection(exc.code, str(exc).split(": ", 1)[-1])))
        return Probed(header)

    async def _header(self, item: ItemRef, head: bytes) -> Any:
        """The header from the first bytes; a header that reaches further is read with a larger range."""
        for data in (head, None):
            if data is None:
                data = await self._get(item, f"bytes=0-{TAIL_BYTES - 1}") if item.size > len(head) else head
            try:
                return read_header(io.BytesIO(data))
            except ProbeError as exc:
                if len(data) >= item.size or exc.refusal.rejection.code != "unreadable":
                    raise
        return read_header(io.BytesIO(await self.read(item)))

    async def _check_structure(self, item: ItemRef, head: bytes) -> None:
        tail = head if item.size <= len(head) else await self._get(item, f"bytes=-{TAIL_BYTES}")
        try:
            check_ends(head, tail, item.size)
        except NeedsWholeFile:
            check_input(await self.read(item))

    async def read(self, item: ItemRef) -> bytes:
        data = await self._get(item)
        if len(data) != item.size:
            raise SourceError("source_changed", "the object changed after it was listed; the next run redoes it")
        return data

    async def sha256(self, item: ItemRef) -> str | None:
        import hashlib

        try:
            return hashlib.sha256(await self.read(item)).hexdigest()
        except SourceError:
            return None


# ---- outputs ---------------------------------------------------------------------------------
class S3OutputStore:
    """Outputs under an S3 prefix; each object carries the proof that it is an item's finished upscale."""

    carries_proof = True

    def __init__(self, access: S3Access, url: S3Url, staging: LocalOutputStore | None = None) -> None:
        self.access = access
        self.bucket = url.bucket
        self.prefix = url.key if not url.key or url.key.endswith("/") else url.key + "/"
        self._keys: set[str] = set()  # relpaths under the prefix, listed once per run (and what it wrote)
        # A local folder (in the state folder) where arriving outputs are staged before their upload:
        # memory stays flat in output size, and a failed upload still has the paid image on disk.
        self._staging = staging

    def _key(self, relpath: str) -> str:
        return self.prefix + relpath

    def check_path(self, relpath: str) -> None:
        problem = key_problem(self._key(relpath))
        if problem is not None:
            raise OutputPathError(f"{relpath}: {problem}")

    def exists(self, relpath: str) -> bool:
        return relpath in self._keys

    def shown(self, relpath: str) -> str:
        return f"s3://{self.bucket}/{self._key(relpath)}"

    async def prepare(self) -> None:
        """List the output prefix once: what exists, without a HEAD per item."""
        async for entry in self.access.entries(self.bucket, self.prefix):
            self._keys.add(str(entry["Key"])[len(self.prefix):])

    async def proof(self, relpath: str) -> Proof | None:
        """The object's own record of how it was made (one HEAD), or None if it has none."""
        try:
            head = await self.access.call(self.bucket, "s3:GetObject", "head_object", Key=self._key(relpath))
        except ClientError:
            return None
        note = note_from_metadata(head.get("Metadata") or {})
        return None if note is None else Proof(note, int(head.get("ContentLength", 0)))

    async def read_verified(self, relpath: str, size: int | None, digest: str | None) -> bytes | None:
        if digest is None:
            return None
        try:
            response = await self.access.call(self.bucket, "s3:GetObject", "get_object", Key=self._key(relpath))
            async with response["Body"] as body:
                data = bytes(await body.read())
        except (ClientError, BotoCoreError, OSError):
            return None
        if size is not None and len(data) != size:
            return None
        return data if xxhash.xxh3_128(data).hexdigest() == digest else None

    async def write(self, relpath: str, parts: FileParts, mtime_ns: int | None, note: OutputNote) -> Written:
        """One PutObject (atomic), retried on transient errors; OSError when it still fails."""
        body = b"".join(parts)
        digest = xxhash.xxh3_128(body).hexdigest()
        key = self._key(relpath)
        try:
            await self.access.call(self.bucket, "s3:PutObject", "put_object", Key=key, Body=body,
                                   ContentType=_content_type(key), Metadata=metadata_of(note, digest))
        except (ClientError, BotoCoreError) as exc:
            raise OSError(f"upload to {self.shown(relpath)} failed: {exc}") from None
        self._keys.add(relpath)
        return Written(len(body), digest)

    # ---- outputs that arrive as a stream: staged in a local file, then uploaded -----------------------
    def open_sink(self, offload: Offload) -> StagingFileSink:
        if self._staging is None:
            raise OSError("no local staging folder for S3 outputs")
        return self._staging.open_sink(offload)

    async def adopt(self, staged: StagedFile, relpath: str, mtime_ns: int | None, note: OutputNote) -> Written:
        """Upload a staged output: one PutObject up to ``PART_BYTES``, a multipart upload above (one
        part in memory at a time). The staged file is removed once uploaded; on an error it stays
        for the caller (``discard``), and OSError says why."""
        key = self._key(relpath)
        meta = metadata_of(note, staged.digest)
        try:
            if staged.size <= PART_BYTES:
                body = await asyncio.to_thread(staged.path.read_bytes)
                await self.access.call(self.bucket, "s3:PutObject", "put_object", Key=key, Body=body,
                                       ContentType=_content_type(key), Metadata=meta)
            else:
                await self._multipart(staged, key, meta)
        except (ClientError, BotoCoreError) as exc:
            raise OSError(f"upload to {self.shown(relpath)} failed: {exc}") from None
        self._keys.add(relpath)
        self.discard(staged)
        return Written(staged.size, staged.digest)

    async def _multipart(self, staged: StagedFile, key: str, meta: dict[str, str]) -> None:
        upload = await self.access.call(self.bucket, "s3:PutObject", "create_multipart_upload", Key=key,
                                        ContentType=_content_type(key), Metadata=meta)
        upload_id = upload["UploadId"]
        try:
            parts = []
            with staged.path.open("rb") as fh:
                for number in itertools.count(1):
                    chunk = await asyncio.to_thread(fh.read, PART_BYTES)
                    if not chunk:
                        break
                    part = await self.access.call(self.bucket, "s3:PutObject", "upload_part", Key=key,
                                                  UploadId=upload_id, PartNumber=number, Body=chunk)
                    parts.append({"PartNumber": number, "ETag": part["ETag"],
                                  **{k: v for k, v in part.items() if k.startswith("Checksum")}})
            await self.access.call(self.bucket, "s3:PutObject", "complete_multipart_upload", Key=key,
                                   UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            # Parts left behind cost storage: abort them (needs s3:AbortMultipartUpload; best effort).
            with contextlib.suppress(Exception):
                await self.access.call(self.bucket, "s3:AbortMultipartUpload", "abort_multipart_upload", Key=key,
                                       UploadId=upload_id)
            raise

    def discard(self, staged: StagedFile) -> None:
        with contextlib.suppress(OSError):
            os.unlink(staged.path)

    async def _owners(self) -> dict[str, dict[str, bool]]:
        try:
            response = await self.access.call(self.bucket, "s3:GetObject", "get_object", Key=self._key(OWNER_KEY))
            async with response["Body"] as body:
                document = json.loads(await body.read())
        except ClientError:
            return {}
        jobs = document.get("jobs") if isinstance(document, dict) else None
        return dict(jobs) if isinstance(jobs, dict) else {}

    async def claim(self, job: str, shared: bool) -> None:
        jobs = await self._owners()
        await self.check_claim(job, shared, jobs)
        if jobs.get(job) != {"shared": shared}:
            jobs[job] = {"shared": shared}
            body = (json.dumps({"version": 1, "jobs": jobs}, indent=2, sort_keys=True) + "\n").encode()
            await self.access.call(self.bucket, "s3:PutObject", "put_object", Key=self._key(OWNER_KEY), Body=body,
                                   ContentType="application/json")

    async def check_claim(self, job: str, shared: bool, jobs: dict[str, dict[str, bool]] | None = None) -> None:
        problem = owner_problem(self.shown(""), self.shown(OWNER_KEY), jobs if jobs is not None else
                                await self._owners(), job, shared)
        if problem is not None:
            raise UsageError(problem)

    async def probe_writable(self) -> None:
        """A real PutObject under the prefix before paying for anything: the job's marker object is
        rewritten as it is (so a run needs no s3:DeleteObject)."""
        marker = await self._owners()
        body = (json.dumps({"version": 1, "jobs": marker}, indent=2, sort_keys=True) + "\n").encode()
        await self.access.call(self.bucket, "s3:PutObject", "put_object", Key=self._key(OWNER_KEY), Body=body,
                               ContentType="application/json")

    async def clean_stale_staging(self) -> int:
        # An upload is atomic (PutObject, or a multipart upload completed at once): nothing
        # half-written is left in S3; dead runs' local staging files are removed here.
        return 0 if self._staging is None else await self._staging.clean_stale_staging()

    async def close(self) -> None:
        """The run's local staging folder goes; the clients belong to the run's S3Access."""
        if self._staging is not None:
            await self._staging.close()

    async def download(self, relpath: str, target: Path) -> bool:
        """An object under the prefix, streamed to a local file; False if it does not exist."""
        try:
            response = await self.access.call(self.bucket, "s3:GetObject", "get_object", Key=self._key(relpath))
        except ClientError:
            return False
        with target.open("wb") as out:
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(1 << 20):
                    out.write(chunk)
        return True

    async def upload_file(self, path: Path, relpath: str) -> None:
        """A report file, published under the prefix."""
        await self.access.call(self.bucket, "s3:PutObject", "put_object", Key=self._key(relpath),
                               Body=path.read_bytes(), ContentType=_content_type(path.name))


def _content_type(name: str) -> str:
    return _CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


_META = "bu-"  # prefix of this tool's user metadata keys (x-amz-meta-bu-…)


def metadata_of(note: OutputNote, digest: str) -> dict[str, str]:
    """The note as S3 user metadata (ASCII only: the source URL is percent-encoded)."""
    sizes = {"output-size": note.output_size, "sent-size": note.sent_size}
    meta = {"source": urllib.parse.quote(note.source, safe=":/"), "source-sha256": note.source_sha256,
            "params": note.params_hash, "digest": digest, "version": note.tool_version}
    if note.source_etag:
        meta["source-etag"] = note.source_etag
    meta |= {k: f"{v[0]}x{v[1]}" for k, v in sizes.items() if v}
    return {_META + k: v for k, v in meta.items()}


def note_from_metadata(meta: Mapping[str, str]) -> OutputNote | None:
    values = {k[len(_META):]: v for k, v in meta.items() if k.startswith(_META)}
    if not {"source", "source-sha256", "params", "digest"} <= set(values):
        return None  # not written by this tool: no proof of anything
    return OutputNote(urllib.parse.unquote(values["source"]), values.get("source-etag"), values["source-sha256"],
                      values["params"], values["digest"], _size(values.get("output-size")),
                      _size(values.get("sent-size")), values.get("version", "?"))


def _size(text: str | None) -> tuple[int, int] | None:
    if not text or "x" not in text:
        return None
    width, _, height = text.partition("x")
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else None
