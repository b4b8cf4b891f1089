"""The shards' share board: where each shard of a job on ``auto`` posts the rate it gets, and reads the others'.

Shards on ``auto`` with no quota known job-wide each measure only what they get, so nothing in one
shard's own view of the quota says it is starving (docs/benchmarks.md §11). The board is the one
thing they already share: the job's report folder (``<report_dir>/shards/rates/<label>.json``, a
local folder on one machine or a shared filesystem, or an S3 prefix). fairshare.py decides what to
post and what the posts mean; this module only stores and reads them.

A post is a few bytes, replaced whole (a local file by rename; an S3 PUT is atomic). A post that
cannot be read (half-written by something else, deleted while listed) is skipped: the board is
advice, and a missing post only makes the fair share a little less exact for one round. Nothing
is deleted (runs never delete in S3): a shard that stops posts that it wants nothing more.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import ClientError

from batch_upscaler.report import write_json_atomically
from batch_upscaler.storage.urls import S3Url

BOARD_DIR = "shards/rates"


@dataclass(frozen=True)
class Post:
    """What one shard got in its last period."""

    label: str  # the shard, e.g. ``0007-of-0032``
    rpm: float  # accepted requests per minute
    limited: bool  # the rate, not its workers or a lack of work, held it back: it wants more
    at: float  # when (epoch seconds: shards on different machines compare these)

    @classmethod
    def parse(cls, text: str | bytes) -> Post | None:
        try:
            data = json.loads(text)
            return cls(str(data["label"]), float(data["rpm"]), bool(data["limited"]), float(data["at"]))
        except (ValueError, TypeError, KeyError):
            return None

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class ShareBoard(Protocol):
    async def post(self, post: Post) -> None: ...
    async def labels(self) -> list[str]:
        """The shards that have posted (one listing: a LIST page per 1,000 shards on S3)."""
        ...
    async def get(self, label: str) -> Post | None:
        """A shard's latest post; None if it cannot be read."""
        ...


class LocalShareBoard:
    """The board as a folder of small JSON files, one per shard."""

    def __init__(self, report_root: Path) -> None:
        self.folder = report_root / BOARD_DIR

    async def post(self, post: Post) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.folder / f"{post.label}.json", asdict(post))

    async def labels(self) -> list[str]:
        return sorted(path.stem for path in self.folder.glob("*.json"))

    async def get(self, label: str) -> Post | None:
        try:
            return Post.parse((self.folder / f"{label}.json").read_bytes())
        except OSError:
            return None


class S3ShareBoard:
    """The board as objects under the report prefix: a PUT per post, a LIST and a GET per post read."""

    def __init__(self, access: Any, report_root: S3Url) -> None:
        self.access, self.prefix = access, report_root.child(f"{BOARD_DIR}/")

    async def post(self, post: Post) -> None:
        await self.access.call(self.prefix.bucket, "s3:PutObject", "put_object",
                               Key=f"{self.prefix.key}{post.label}.json", Body=post.dumps().encode(),
                               ContentType="application/json")

    async def labels(self) -> list[str]:
        return [str(entry["Key"])[len(self.prefix.key):].removesuffix(".json")
                async for entry in self.access.entries(self.prefix.bucket, self.prefix.key)
                if str(entry["Key"]).endswith(".json")]

    async def get(self, label: str) -> Post | None:
        try:
            response = await self.access.call(self.prefix.bucket, "s3:GetObject", "get_object",
                                              Key=f"{self.prefix.key}{label}.json")
        except ClientError:
            return None  # gone between the LIST and the GET (a report folder cleared by hand)
        async with response["Body"] as body:
            return Post.parse(await body.read())


def share_board(report_root: Path | S3Url, access: Any) -> ShareBoard:
    """The board under the job's report folder (``access``: the job's S3 access, for an S3 report_dir)."""
    if isinstance(report_root, S3Url):
        return S3ShareBoard(access, report_root)
    return LocalShareBoard(report_root)
