"""Where ``requests_per_minute: auto`` starts: a rate remembered from earlier runs, the applied
quota, or cold.

Its one job is that decision and the memory behind it. A run of ``auto`` leaves the rate it
ended at (:attr:`~batch_upscaler.ratelimit.AdaptiveRateLimiter.rate_to_remember`) in two places:
its checkpoint's run record (the job's own history) and ``<state_dir>/rates.json``, shared by
every job in the state folder. Both are keyed by backend, profile, region and model id: the
quota belongs to the account, region and model, not to the job. Rates are stored job-wide (a
shard stores its rate × the shards running at once) and each shard starts at its share.

In order, ``auto`` starts at:
1. the latest remembered rate (this job's or another's). Trusted when the run that left it
   measured the quota (it was throttled) no longer ago than ``limits.remembered_rate_max_age``
   (7 days): the run starts there and only probes gently. Otherwise it is a guess: the run starts
   there, capped by the applied quota when that is known, and the first throttle is checked;
2. the applied quota from Service Quotas (quotas.py), as a guess;
3. cold: 60/min, doubling every half second until the first throttle.
An unmeasured run never replaces a measured rate: a few images that never met the quota say
nothing about it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batch_upscaler.checkpoint import RunRate
from batch_upscaler.progress import human_duration
from batch_upscaler.quotas import AppliedQuota
from batch_upscaler.ratelimit import AdaptiveRateLimiter, RateLimiter, StartRate
from batch_upscaler.settings import JobSettings
from batch_upscaler.shards import Shard

log = logging.getLogger(__name__)

RATES_FILE = "rates.json"


@dataclass(frozen=True)
class Remembered:
    """A rate a run left for later runs (job-wide requests per minute)."""

    rpm: float
    measured: bool  # the run was throttled and measured the quota; else the rate only says what it used
    at: float  # when (epoch seconds)
    job: str


@dataclass(frozen=True)
class StartChoice:
    """Where a run starts, and why (for the log, ``plan`` and the run record)."""

    start: StartRate | None  # None: cold
    why: str

    @property
    def rpm(self) -> float | None:
        return None if self.start is None else self.start.rpm

    @property
    def ceiling(self) -> float | None:
        """A shard's share of a quota known job-wide, when there is one."""
        return None if self.start is None else self.start.ceiling


def memory_key(settings: JobSettings) -> str:
    """Runs with the same key share one quota: the same account (profile), region and model. The
    endpoint is left out: a VPC endpoint (or an emulator on another port) answers for the same quota."""
    return f"{settings.backend.value}|{settings.profile or '-'}|{settings.region}|{settings.model_id}"


class RateMemory:
    """``<state_dir>/rates.json``: the latest remembered rate per key, for every job in the folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RATES_FILE

    def recall(self, key: str) -> Remembered | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Remembered(float(entry["rpm"]), bool(entry["measured"]), float(entry["at"]), str(entry["job"]))
        except (TypeError, KeyError, ValueError):
            return None  # absent, or written by something else: start without it

    def remember(self, key: str, entry: Remembered) -> None:
        """Store ``entry`` unless it is unmeasured and a measured rate is already there."""
        with self._locked():
            rates = self._read()
            old = rates.get(key)
            if not entry.measured and isinstance(old, dict) and old.get("measured"):
                return
            rates[key] = asdict(entry)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(rates, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Shards of one job finish together: read-modify-write under a lock so none is lost.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


def latest(job: Remembered | None, shared: Remembered | None) -> Remembered | None:
    """The one to start from: a measured rate before an unmeasured one, then the more recent."""
    candidates = [r for r in (job, shared) if r is not None]
    return max(candidates, key=lambda r: (r.measured, r.at), default=None)


def trusted(remembered: Remembered | None, now: float, max_age_s: float) -> bool:
    return remembered is not None and remembered.measured and 0 <= now - remembered.at <= max_age_s


def choose_start(remembered: Remembered | None, quota: AppliedQuota | None, *, now: float, max_age_s: float,
                 shards: int = 1) -> StartChoice:
    """Where ``auto`` starts (pure: every input is given)."""
    share = f" ÷ {shards} shards" if shards > 1 else ""
    # Shards share the quota fairly only when each is held to its share of a quota known job-wide.
    ceiling, capped = None, ""
    if quota is not None and shards > 1:
        ceiling = quota.rpm / shards
        capped = f", at most {ceiling:g}/min (its share of the applied quota {quota.rpm:g}/min)"
    if remembered is not None:
        age = human_duration(max(0.0, now - remembered.at))
        what = f"the rate job {remembered.job} ended at {age} ago{share}"
        if trusted(remembered, now, max_age_s):
            return StartChoice(StartRate(remembered.rpm / shards, trusted=True, ceiling=ceiling),
                               what + " (measured: trusted)" + capped)
        rpm = remembered.rpm if quota is None else min(remembered.rpm, quota.rpm)
        why = "not measured" if not remembered.measured else f"older than {human_duration(max_age_s)}"
        return StartChoice(StartRate(rpm / shards, ceiling=ceiling), f"{what} ({why}: a guess, checked){capped}")
    if quota is not None:
        return StartChoice(StartRate(quota.rpm / shards, ceiling=ceiling),
                           f"the applied quota {quota.rpm:g}/min ({quota.name}, {quota.code}){share}: a guess, checked"
                           + capped)
    return StartChoice(None, "cold: nothing remembered and no applied quota known")


def unshared_warning(choice: StartChoice, shard: Shard) -> str | None:
    """What to tell the operator when shards on ``auto`` start without a quota known job-wide and with
    their share board turned off: each then finds the quota on its own, and they do not share it
    fairly (docs/benchmarks.md §11)."""
    if shard.sharing <= 1 or shard.share_every_s > 0 or choice.ceiling is not None:
        return None
    return (f"rate: {shard.sharing} shards on auto with no applied quota known and shards.share_every 0: each "
            "finds the quota on its own and they may not share it fairly (one can starve); allow "
            "servicequotas:ListServiceQuotas (limits.quota_lookup), keep shards.share_every on, or set "
            "limits.requests_per_minute")


def recall(settings: JobSettings, job_history: tuple[float, bool, float] | None) -> Remembered | None:
    """The best remembered rate for ``settings``: the job's own last one or the state folder's."""
    own = None if job_history is None else Remembered(job_history[0], job_history[1], job_history[2], settings.name)
    return latest(own, RateMemory(settings.state_dir).recall(memory_key(settings)))


async def decide_start(settings: JobSettings, job_history: tuple[float, bool, float] | None,
                       ask_quota: Callable[[], Awaitable[AppliedQuota | None]], now: float) -> StartChoice:
    """Where this run of ``auto`` starts; Service Quotas is asked when no trusted rate is known, and
    always by a shard (its share of the applied quota is its ceiling)."""
    remembered = recall(settings, job_history)
    quota = None
    needed = settings.shard.sharded or not trusted(remembered, now, settings.limits.remembered_rate_max_age_s)
    if needed and settings.limits.quota_lookup:
        quota = await ask_quota()
    return choose_start(remembered, quota, now=now, max_age_s=settings.limits.remembered_rate_max_age_s,
                        shards=settings.shard.sharing)


def leave_rate(settings: JobSettings, limiter: RateLimiter | None, start: StartChoice | None, requests: int,
               now: float) -> RunRate | None:
    """What this run leaves the next one (in the run record and rates.json); None when it sent nothing
    or its rate was not ``auto``."""
    if not isinstance(limiter, AdaptiveRateLimiter) or requests == 0:
        return None
    rate = RunRate(start_rpm=None if start is None else start.rpm, key=memory_key(settings),
                   remembered_rpm=limiter.rate_to_remember * settings.shard.sharing,
                   measured=limiter.estimate_rpm is not None)
    assert rate.key is not None and rate.remembered_rpm is not None
    with contextlib.suppress(OSError):  # a rate not remembered only costs the next run its start
        RateMemory(settings.state_dir).remember(rate.key, Remembered(rate.remembered_rpm, bool(rate.measured), now,
                                                                     settings.name))
    return rate
