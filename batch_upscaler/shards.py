"""Shards: one job split across machines that an engine runs (AWS Batch array jobs, Kubernetes
Indexed Jobs), each taking its own items, with its own checkpoint, lock and report.

An item belongs to shard ``h(identity) mod count``, where ``h`` is SHA-256 (the same on every
machine, Python version and run; never Python's ``hash()``) of the item's machine-independent
identity — its key (``<source as written>:<path below it>``, or ``s3://bucket/key``) with the
file extension removed and the name folded as outputs are compared (NFC + case folding). So
``a.jpg`` and ``a.PNG`` next to each other, whose outputs would be the same file, always land in
the same shard, where output ownership is decided. Every shard lists the whole source and keeps
only its own items, so no shard depends on another having run.
"""

from __future__ import annotations

import hashlib
import posixpath
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1
    # How many shards the engine runs at once (Kubernetes ``parallelism``, Batch's vCPU cap); None:
    # all of them. The job's rate and quota are split among the shards running, not among all.
    at_once: int | None = None
    # Shards on ``auto`` without a known quota compare what they get this often (fairshare.py); 0: never.
    share_every_s: float = 10.0

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def sharing(self) -> int:
        """How many shards share the job's rate at any one time."""
        return min(self.at_once or self.count, self.count)

    @property
    def label(self) -> str:
        """``0007-of-0032``: names the shard's checkpoint, lock and report folder."""
        return f"{self.index:04d}-of-{self.count:04d}"

    def owns(self, key: str) -> bool:
        return not self.sharded or shard_of(key, self.count) == self.index


def identity(key: str) -> str:
    """What the partition hashes: the key without its extension, Unicode-normalised and case-folded."""
    stem, _ = posixpath.splitext(key)
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", stem).casefold())


def shard_of(key: str, count: int) -> int:
    """The shard (0-based) that owns ``key`` among ``count``; stable everywhere, for any count ≥ 1."""
    digest = hashlib.sha256(identity(key).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count
