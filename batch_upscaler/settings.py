"""The frozen settings object one job runs with, built once at the CLI edge and passed down.

Nothing below the CLI reads the environment or a file to learn a setting: it gets a
:class:`JobSettings` (what the job is) and a :class:`RunOptions` (what this invocation does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batch_upscaler.catalogue import ModelSpec
from batch_upscaler.shards import Shard
from batch_upscaler.storage.urls import Location


class Backend(StrEnum):
    BEDROCK = "bedrock"
    EMULATOR = "emulator"


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"
    SAME = "same"  # the accepted format closest to each source's (TIFF, BMP, GIF, ... -> png)

    @property
    def extension(self) -> str:
        return ".jpg" if self is OutputFormat.JPEG else f".{self.value}"

    def for_source(self, pil_format: str | None) -> OutputFormat:
        """The concrete format an item's output gets (resolves ``same``)."""
        if self is not OutputFormat.SAME:
            return self
        return {"JPEG": OutputFormat.JPEG, "MPO": OutputFormat.JPEG, "WEBP": OutputFormat.WEBP}.get(
            pil_format or "", OutputFormat.PNG)


class NameCompare(StrEnum):
    """How output names are compared for ownership: as the output filesystem compares them."""

    CASEFOLD = "casefold"  # Unicode NFC + case folding (macOS, Windows, most NAS shares): the safe default
    NFC = "nfc"  # Unicode-normalised but case-sensitive
    EXACT = "exact"  # byte-for-byte names (a case-sensitive Linux volume)


class Oversize(StrEnum):
    DOWNSCALE = "downscale"
    SKIP = "skip"


class Undersize(StrEnum):
    SKIP = "skip"
    ENLARGE = "enlarge"


class AspectPolicy(StrEnum):
    PAD = "pad"
    SKIP = "skip"


class AlphaPolicy(StrEnum):
    FLATTEN = "flatten"
    KEEP = "keep"


@dataclass(frozen=True)
class PrepareSettings:
    """How a source image is made into a valid request (defaults suit photo archives)."""

    apply_orientation: bool = True
    oversize: Oversize = Oversize.DOWNSCALE
    undersize: Undersize = Undersize.SKIP
    aspect: AspectPolicy = AspectPolicy.PAD
    alpha: AlphaPolicy = AlphaPolicy.FLATTEN
    background: tuple[int, int, int] = (255, 255, 255)
    # An upscale must come back larger than the source on both sides by this factor, or it is not
    # paid for (skipped ``no_gain``); 1.0 means "strictly larger".
    min_gain: float = 1.0


@dataclass(frozen=True)
class MetadataSettings:
    """What is carried from each source to its output (spliced in, never re-encoded), and what is sent."""

    exif: bool = True
    gps: bool = True  # false also keeps the GPS out of what is sent
    icc: bool = True
    mtime: bool = True
    send_metadata: bool = True  # false: EXIF, XMP, IPTC and comments are stripped from what is sent


@dataclass(frozen=True)
class Limits:
    """Throughput and robustness dials; concurrency and rate are deliberately separate."""

    concurrency: int = 4
    requests_per_minute: float | None = 30.0  # None: ``auto``, find the quota adaptively
    max_attempts: int = 6
    read_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 60.0
    max_cost_usd: float | None = None  # per run: no new request once the estimated spend would pass it
    retry_after_max_s: float = 60.0  # a server's Retry-After is honoured up to this long
    # After an attempt that may have been billed without an answer (time-out, crash, cut-off
    # response), at most this many more are sent for the image, across runs.
    possibly_billed_resends: int = 1
    # The outage breaker: this many errors where nothing ran, in a row across the pool, pause every
    # worker; the service is then probed for up to outage_wait_s before the run stops (exit 75).
    outage_errors: int = 8
    outage_wait_s: float = 900.0
    shard_rpm: float | None = None  # a shard's own ceiling; None: requests_per_minute / shards at once
    # ``auto`` starts from the rate the last run ended at; older than this, it is a guess to check.
    remembered_rate_max_age_s: float = 7 * 86400.0
    quota_lookup: bool = True  # ``auto`` may read the model's applied RPM quota from Service Quotas
    quota_code: str | None = None  # that quota's code, when its name cannot be matched (see README)


@dataclass(frozen=True)
class EmulatorSettings:
    """Knobs of the embedded emulator used when ``backend: emulator``."""

    output_max_pixels: int | None = None
    latency_s: float = 0.0
    quota_rpm: float | None = None


@dataclass(frozen=True)
class AwsSources:
    """Where the AWS settings in use came from: shown by plan, run and doctor, never decided by.

    ``region`` is one of --region, manifest, config file, AWS_REGION, AWS_DEFAULT_REGION,
    "profile NAME" or default; ``endpoint`` one of --endpoint-url, manifest, config file,
    AWS_ENDPOINT_URL_BEDROCK_RUNTIME, AWS_ENDPOINT_URL, "embedded emulator" or default.
    """

    region: str = "default"
    endpoint_url: str | None = None  # where requests go when known: configured, or botocore's from the environment
    endpoint: str = "default"
    profile: str | None = None  # bedrock.profile, else the one botocore picks (AWS_PROFILE); None: "default"


@dataclass(frozen=True)
class S3Settings:
    """How S3 sources, outputs and reports are reached (everything optional: the AWS chain decides)."""

    region: str | None = None  # None: each bucket's own region, then the AWS chain
    endpoint_url: str | None = None  # any S3-compatible endpoint; None lets botocore read AWS_ENDPOINT_URL_S3
    profile: str | None = None
    checksums: str = "when_supported"  # botocore's flexible checksums; when_required for stores that reject them


@dataclass(frozen=True)
class JobSettings:
    """Everything a job is, with paths resolved and defaults applied."""

    name: str
    manifest_path: Path
    base_dir: Path  # relative manifest paths are relative to this
    sources: tuple[str, ...]
    exclude: tuple[str, ...]
    output_dir: Location  # a local folder or an S3 prefix
    output_format: OutputFormat
    model: ModelSpec
    model_id: str  # the inference-profile id actually invoked
    params: Mapping[str, Any]  # request parameters except ``image``
    backend: Backend
    region: str
    endpoint_url: str | None
    profile: str | None  # configured (bedrock.profile); None lets botocore choose (AWS_PROFILE, default)
    limits: Limits
    state_dir: Path
    report_root: Location  # report_dir as configured; a shard reports under <report_root>/shards/<label>/
    emulator: EmulatorSettings = field(default_factory=EmulatorSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    naming: str = "{relpath}"
    name_compare: NameCompare = NameCompare.CASEFOLD
    output_shared: bool = False  # output.shared: other jobs may write into output_dir (disjoint names)
    shard: Shard = field(default_factory=Shard)  # this machine's part of the job (index from the engine)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    aws: AwsSources = field(default_factory=AwsSources)
    # Service Quotas' endpoint for ``auto``'s quota lookup; None: botocore's (AWS_ENDPOINT_URL_SERVICE_QUOTAS
    # or the region's). The embedded emulator answers these calls itself.
    quotas_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def state_stem(self) -> str:
        """The job's name, and its shard's label when sharded (two shards never share a checkpoint or lock)."""
        return f"{self.name}.shard-{self.shard.label}" if self.shard.sharded else self.name

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / f"{self.state_stem}.sqlite"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / f"{self.state_stem}.lock"

    @property
    def report_dir(self) -> Location:
        """Where this job's (or this shard's) report goes."""
        if not self.shard.sharded:
            return self.report_root
        if isinstance(self.report_root, Path):
            return self.report_root / "shards" / self.shard.label
        return self.report_root.child(f"shards/{self.shard.label}/")


@dataclass(frozen=True)
class RunOptions:
    """What this one invocation of ``run`` does beyond the job's settings."""

    limit: int | None = None  # at most this many items are started (--max-images / --limit)
    retry_failed: bool = False  # failed items become pending again
    show_progress: bool | None = None  # None: only when stderr is a terminal
    max_duration_s: float | None = None  # no new item starts after this long (cron windows)
    grace_s: float = 120.0  # after a stop request, how long requests in flight may take to finish
    heartbeat_s: float = 60.0  # without a progress bar: one summary line this often
    only: frozenset[str] | None = None  # --only: just these items (display paths, as in failed.txt)
    metrics_path: Path | None = None  # None: <report_dir>/metrics.prom
    metrics_interval_s: float = 15.0
    verify_outputs: bool = False  # redo a finished item whose output is not byte-for-byte what was written
    strict_exit: bool = False  # exit 1 for any failed item, not only for failures of this run
    buffered_responses: bool = False  # benchmarks only: hold each answer whole, as before streaming (bench/cost.py)


def request_fingerprint(settings: JobSettings) -> str:
    """Hash of everything besides the image that affects what is returned.

    ``metadata`` is left out on purpose, ``send_metadata`` and ``gps`` included: they only take
    metadata out of the bytes sent, never pixels, so the model returns the same image and finished
    items need not be paid for again. (The output's metadata comes from the source file.)
    """
    prepare = dataclasses.asdict(settings.prepare)
    del prepare["min_gain"]  # decides whether to send, not what is sent: see checks_fingerprint
    canonical = json.dumps({"model": settings.model.base_id, "params": dict(settings.params),
                            "output_format": settings.output_format.value,
                            "prepare": prepare}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def checks_fingerprint(settings: JobSettings) -> str:
    """Hash of what the checks before paying compare an image with (the model's limits, the
    minimum gain): a skip decided under other limits is decided again (raising a limit must not
    leave images skipped under the old one), while finished items are not redone for it."""
    canonical = json.dumps({"limits": dataclasses.asdict(settings.model.limits),
                            "min_gain": settings.prepare.min_gain,
                            "output": [settings.model.output_target_pixels, settings.model.output_side_factor]},
                           sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
