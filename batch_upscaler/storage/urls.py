"""Where a manifest's paths point: a local path or an ``s3://bucket/key`` URL, parsed and checked once.

This and the manifest parser are the only places that know what an S3 URL looks like; everything
downstream gets a :data:`Location` (a ``Path`` or an :class:`S3Url`) and hands it to the storage
edge, which picks the implementation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from wcmatch import glob as wcglob

_SCHEME = "s3://"
# Bucket naming rules (general purpose buckets): 3-63 chars of lowercase letters, digits, dots and
# hyphens, starting and ending with a letter or digit, not an IP address, no ".." and none of the
# reserved prefixes and suffixes.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")
_RESERVED = (("xn--", "sthree-", "amzn-s3-demo-"), ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"))
GLOB_FLAGS = wcglob.GLOBSTAR | wcglob.IGNORECASE | wcglob.BRACE


@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/key``: for a source, ``key`` is a prefix (ending in ``/``), an object, or a glob."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{_SCHEME}{self.bucket}/{self.key}"

    def child(self, relpath: str) -> S3Url:
        """The object ``relpath`` below this prefix."""
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Url(self.bucket, prefix + relpath)

    def split_glob(self) -> tuple[str, str | None]:
        """(listing prefix, glob pattern below it or None): ``a/b/**/*.jpg`` → (``a/b/``, ``**/*.jpg``)."""
        parts = self.key.split("/")
        magic = next((i for i, part in enumerate(parts) if wcglob.is_magic(part, flags=GLOB_FLAGS)), None)
        if magic is None:
            return self.key, None
        prefix = "/".join(parts[:magic])
        return (prefix + "/" if prefix else ""), "/".join(parts[magic:])


Location = Path | S3Url


def is_s3(text: str) -> bool:
    return text.strip().lower().startswith(_SCHEME)


def s3_url_problem(text: str) -> str | None:
    """Why ``text`` is not a usable ``s3://bucket/key`` URL, or None."""
    rest = text.strip()[len(_SCHEME):]
    bucket, _, _key = rest.partition("/")
    if not bucket:
        return f"{text!r} names no bucket (use s3://bucket/prefix/)"
    if wcglob.is_magic(bucket, flags=GLOB_FLAGS):
        return f"{text!r}: a glob is allowed in the key, not in the bucket name {bucket!r}"
    if (not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP.fullmatch(bucket)
            or bucket.startswith(_RESERVED[0]) or bucket.endswith(_RESERVED[1])):
        return (f"{text!r}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.' or '-', "
                "starting and ending with a letter or digit)")
    return None


def parse_s3(text: str) -> S3Url:
    """An already validated S3 URL (see :func:`s3_url_problem`)."""
    rest = text.strip()[len(_SCHEME):]
    bucket, _, key = rest.partition("/")
    return S3Url(bucket, key)


def key_problem(key: str) -> str | None:
    """Why ``key`` may not be an output object key: no ``..``, no leading ``/``, no empty segments."""
    if key.startswith("/"):
        return f"{key!r} starts with '/'"
    if any(part in ("", ".", "..") for part in PurePosixPath(key).parts[:-1]) or "//" in key or "/../" in f"/{key}/":
        return f"{key!r} has an empty, '.' or '..' segment"
    if len(key.encode("utf-8", "surrogateescape")) > 1024:
        return f"{key[:40]!r}… is longer than S3's 1,024-byte key limit"
    return None
