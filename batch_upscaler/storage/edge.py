"""A job's storage edge, opened together: its sources (local and S3, listed as one stream), its
output store (a local folder or an S3 prefix) and where its report goes, with the S3 clients they
need in the run's one AWS session. :func:`open_storage` picks the implementations; nothing
downstream asks which it got.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiobotocore.session import AioSession

from batch_upscaler.discovery import Discovery, Found, SourceRoot, accepts, parse_source
from batch_upscaler.errors import UsageError
from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.base import ItemRef, OutputStore, Probed, SourceReader
from batch_upscaler.storage.local import LocalOutputStore, LocalSourceReader
from batch_upscaler.storage.names import Names
from batch_upscaler.storage.s3 import S3Access, S3OutputStore, S3Root, S3SourceReader, list_found
from batch_upscaler.storage.urls import Location, S3Url, is_s3, parse_s3

log = logging.getLogger(__name__)
DONE_FILE = "done.json"  # a shard's last report file: the merge counts the shard as finished by it


class Sources:
    """The job's sources, local and S3: resolved once, listed as one stream in manifest order, and
    read through the reader of their kind."""

    def __init__(self, settings: JobSettings, access: S3Access | None) -> None:
        self.settings = settings
        self.local: dict[str, SourceRoot] = {}
        self.s3: dict[str, S3Root] = {}
        for spec in settings.sources:
            if is_s3(spec):
                self.s3[spec] = S3Root(spec, parse_s3(spec))
            else:
                self.local[spec] = parse_source(spec, settings.base_dir)
        if self.s3 and access is None:
            raise AssertionError("S3 sources need an S3Access")
        self.names = Names(settings)
        self._local_reader = LocalSourceReader(self.local)
        self._s3_reader = S3SourceReader(access) if access is not None else None
        self._access = access
        prune = [p for p in (settings.output_dir, settings.state_dir) if isinstance(p, Path)]
        self.discovery = Discovery(self.local.values(), settings.exclude, prune=prune, base_dir=settings.base_dir,
                                   on_error=lambda path, msg: log.warning("cannot read %s: %s", path, msg))

    def check(self) -> None:
        """Local sources exist and are not the output or state directory (S3 ones are checked when listed)."""
        pruned = {p.resolve(): key for p, key in ((self.settings.output_dir, "output.dir"),
                                                   (self.settings.state_dir, "state_dir")) if isinstance(p, Path)}
        for i, spec in enumerate(self.settings.sources):
            root = self.local.get(spec)
            if root is None:
                continue
            if not root.root.exists():
                raise UsageError(f"{self.settings.manifest_path}: sources[{i}]: {root.root} does not exist")
            clash = pruned.get(root.root.resolve()) if not root.single_file else None
            if clash is not None:
                raise UsageError(f"{self.settings.manifest_path}: sources[{i}]: {root.root} is the job's {clash}; "
                                 "its files would be overwritten by their own upscales, so it is never scanned "
                                 "(0 files). Choose an output.dir outside the sources")

    async def found(self) -> AsyncIterator[Found]:
        """Every item of every source that this shard owns, in manifest order; a file or object reached
        twice comes once. (Every shard walks or lists the whole source and keeps its own items.)"""
        shard = self.settings.shard
        async for item in self._all_found():
            if shard.owns(item.key):
                yield item

    async def _all_found(self) -> AsyncIterator[Found]:
        seen_urls: set[str] = set()
        overlapping = len(self.s3) > 1  # one S3 source cannot list a key twice: no need to remember keys
        for spec in self.settings.sources:
            if spec in self.local:
                for item in self.discovery.walk_root(self.local[spec]):
                    yield item
                continue
            assert self._access is not None
            async for item in list_found(self._access, self.s3[spec], self.settings.exclude):
                if overlapping:
                    if item.key in seen_urls:
                        continue
                    seen_urls.add(item.key)
                yield item

    def _reader(self, item: ItemRef) -> SourceReader:
        if item.source in self.s3:
            assert self._s3_reader is not None
            return self._s3_reader
        return self._local_reader

    async def probe(self, item: ItemRef) -> Probed:
        return await self._reader(item).probe(item)

    async def read(self, item: ItemRef) -> bytes:
        return await self._reader(item).read(item)

    async def sha256(self, item: ItemRef) -> str | None:
        return await self._reader(item).sha256(item)

    def display(self, source: str, relpath: str, key: str | None = None) -> str:
        """How an item is named to people: its real path, or its ``s3://`` URL (see storage.names)."""
        return self.names.item(source, relpath, key)

    def claims(self, target: Location) -> str | None:
        """The source that would read ``target`` (an output about to be written) as an input."""
        if isinstance(target, Path):
            root = self.discovery.claims(target)
            return None if root is None else root.spec
        for spec, s3root in self.s3.items():
            prefix, pattern = s3root.listing()
            if (target.bucket == s3root.url.bucket and target.key.startswith(prefix)
                    and accepts(target.key[len(prefix):].lstrip("/"), pattern, self.settings.exclude)):
                return spec
        return None


@dataclass(frozen=True)
class Reports:
    """Where the report goes: written into ``local_dir``, then published (uploaded when S3)."""

    local_dir: Path
    shown: str
    store: S3OutputStore | None = None

    async def publish(self) -> str:
        """Upload the report files (a shard's done.json last: the merge reads it as "this shard is done")."""
        if self.store is not None:
            files = [p for p in sorted(self.local_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
            for path in sorted(files, key=lambda p: p.name == DONE_FILE):
                await self.store.upload_file(path, path.name)
        return self.shown


@dataclass(frozen=True)
class Storage:
    sources: Sources
    outputs: OutputStore
    reports: Reports
    s3: S3Access | None

    def output_target(self, relpath: str) -> Location:
        outputs = self.outputs
        if isinstance(outputs, S3OutputStore):
            return S3Url(outputs.bucket, outputs.prefix + relpath)
        assert isinstance(outputs, LocalOutputStore)
        return outputs.root / relpath


def uses_s3(settings: JobSettings) -> bool:
    return (any(is_s3(s) for s in settings.sources) or isinstance(settings.output_dir, S3Url)
            or isinstance(settings.report_dir, S3Url))


@asynccontextmanager
async def open_storage(settings: JobSettings, session: AioSession | None = None) -> AsyncIterator[Storage]:
    """The job's sources, output store and report target, with the S3 clients they need (if any)."""
    async with AsyncExitStack() as stack:
        access = None
        if uses_s3(settings):
            separate = session is None or settings.s3.profile is not None  # s3.profile: its own credentials
            s3_session = AioSession(profile=settings.s3.profile) if separate else session
            access = S3Access(s3_session, settings.s3, stack)
        outputs: OutputStore
        if isinstance(settings.output_dir, S3Url):
            assert access is not None
            staging = LocalOutputStore(settings.state_dir / "s3-staging" / settings.state_stem)
            outputs = S3OutputStore(access, settings.output_dir, staging)
        else:
            outputs = LocalOutputStore(settings.output_dir, settings.base_dir)
        yield Storage(Sources(settings, access), outputs, _reports(settings, access), access)


def _reports(settings: JobSettings, access: S3Access | None) -> Reports:
    if isinstance(settings.report_dir, S3Url):
        assert access is not None
        staging = settings.state_dir / "reports" / settings.state_stem  # written here, then uploaded
        return Reports(staging, str(settings.report_dir), S3OutputStore(access, settings.report_dir))
    return Reports(settings.report_dir, str(settings.report_dir))
