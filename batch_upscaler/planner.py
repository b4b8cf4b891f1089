"""``plan``: what a run would do now, without sending anything or changing the checkpoint.

It runs the run's own first half (recover, scan with every check made before paying, the
failures to retry) on a private snapshot of the checkpoint, so its counts are the ones the run
will see, it takes no lock (a running job is not disturbed, and ``plan`` works beside it), and
nothing it does is ever written back. Requests are the pending items minus the ones
de-duplication will copy: identical content needs identical size, so only files whose size is
shared are read and hashed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aiobotocore.session import AioSession

from batch_upscaler.checkpoint import Checkpoint, ItemState, WorkItem
from batch_upscaler.progress import human_duration
from batch_upscaler.quotas import AppliedQuota, applied_quota
from batch_upscaler.ratememory import StartChoice, decide_start, memory_key
from batch_upscaler.runner import prepare_items, shard_rate
from batch_upscaler.settings import Backend, JobSettings, RunOptions, request_fingerprint
from batch_upscaler.signals import StopSignals
from batch_upscaler.storage.edge import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass
class Plan:
    job: str
    model_id: str
    files_found: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    proven_done: int = 0  # new to this checkpoint, but their outputs prove them done (S3 metadata)
    already_done: int = 0
    to_process: int = 0
    deduplicated: int = 0
    requests: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # no_gain among them: paid, it would shrink
    refused_by_reason: dict[str, int] = field(default_factory=dict)  # found unusable by this plan's checks
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # failed in earlier runs, not retried
    price_per_image_usd: float = 0.0
    estimated_cost_usd: float = 0.0
    requests_per_minute: float | None = None  # the fixed rate, or where ``auto`` would start (None: cold)
    rate_basis: str | None = None  # for ``auto``: where that start comes from (ratememory.py)
    estimated_minutes: float | None = None
    bedrock: dict[str, Any] = field(default_factory=dict)  # region, endpoint and profile in use, and their sources
    shard: str | None = None  # "0007-of-0032" when planned per shard

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_job(settings: JobSettings, options: RunOptions) -> Plan:
    """The plan for the next ``run`` with these options, from a snapshot of the checkpoint."""
    checkpoint = Checkpoint.snapshot(settings.checkpoint_path, settings.name)
    try:
        return asyncio.run(_plan(settings, options, checkpoint))
    finally:
        checkpoint.close()


async def _plan(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint) -> Plan:
    run_id = checkpoint.begin_run()
    checkpoint.recover()
    async with open_storage(settings, AioSession(profile=settings.profile)) as storage:
        await storage.outputs.check_claim(settings.name, settings.output_shared)
        summary = await prepare_items(settings, options, checkpoint, storage, StopSignals(), quiet=True)
        refused = checkpoint.failed_by_run(run_id)
        earlier = {code: n - refused.get(code, 0) for code, n in checkpoint.reasons(ItemState.FAILED).items()}
        counts = checkpoint.counts()
        # Walked page by page, never held: a plan of a million new items stays small.
        to_process, duplicates = await count_duplicates(lambda: _pending(checkpoint, options.limit), checkpoint,
                                                        storage, request_fingerprint(settings))
        start = await _auto_start(settings, checkpoint)
    requests = to_process - duplicates
    rpm = shard_rate(settings) if start is None else start.rpm
    return Plan(
        job=settings.name, model_id=settings.model_id, files_found=summary.discovered, new=summary.new,
        changed=summary.changed, unchanged=summary.unchanged, proven_done=summary.proven,
        already_done=counts[ItemState.SUCCEEDED], to_process=to_process, deduplicated=duplicates,
        requests=requests, skipped_by_reason=checkpoint.reasons(ItemState.SKIPPED), refused_by_reason=refused,
        failed_by_reason={code: n for code, n in earlier.items() if n},
        price_per_image_usd=settings.model.price_usd, estimated_cost_usd=round(requests * settings.model.price_usd, 2),
        requests_per_minute=rpm, rate_basis=None if start is None else start.why,
        estimated_minutes=round(requests / rpm, 3) if rpm else None,
        bedrock={"region": settings.region, "region_source": settings.aws.region,
                 "endpoint_url": settings.aws.endpoint_url, "endpoint_source": settings.aws.endpoint,
                 "profile": settings.aws.profile},
    )


async def _auto_start(settings: JobSettings, checkpoint: Checkpoint) -> StartChoice | None:
    """For ``auto``: the best known rate, as a run would start (a remembered rate, else the applied quota)."""
    if shard_rate(settings) is not None:
        return None

    async def ask_quota() -> AppliedQuota | None:
        if settings.backend is Backend.EMULATOR:  # not started for a plan: its configured quota is the answer
            rpm = settings.emulator.quota_rpm
            return None if rpm is None else AppliedQuota(rpm, "the embedded emulator's quota_rpm", "-")
        return await applied_quota(settings, AioSession(profile=settings.profile), settings.quotas_endpoint_url)

    return await decide_start(settings, checkpoint.last_rate(memory_key(settings)), ask_quota, time.time())


def plan_shards(settings: JobSettings, options: RunOptions) -> list[Plan]:
    """The plan of every shard (each scans the whole source and counts its own items)."""
    plans = []
    for index in range(settings.shard.count):
        shard = replace(settings.shard, index=index)
        plan = plan_job(replace(settings, shard=shard), options)
        plan.shard = shard.label
        plans.append(plan)
    return plans


def render_shards(plans: list[Plan]) -> str:
    """One line per shard, a total, and a warning when the shards are uneven."""
    lines = [f"plan for job {plans[0].job} in {len(plans)} shards — nothing is sent, nothing is changed",
             f"  {'shard':<13}{'files':>9}{'done':>9}{'requests':>10}{'cost':>12}{'time':>12}"]
    for plan in plans:
        duration = human_duration(plan.estimated_minutes * 60) if plan.estimated_minutes is not None else "auto"
        lines.append(f"  {plan.shard:<13}{plan.files_found:>9}{plan.already_done:>9}{plan.requests:>10}"
                     f"{f'${plan.estimated_cost_usd:.2f}':>12}{duration:>12}")
    requests = [p.requests for p in plans]
    total_cost = sum(p.estimated_cost_usd for p in plans)
    lines.append(f"  {'total':<13}{sum(p.files_found for p in plans):>9}{sum(p.already_done for p in plans):>9}"
                 f"{sum(requests):>10}{f'${total_cost:.2f}':>12}")
    mean = sum(requests) / len(requests)
    if mean >= 4 and max(requests) > 1.25 * mean:
        lines.append(f"  warning: shards are uneven (the largest has {max(requests)} requests, the mean {mean:.0f}): "
                     "the job takes as long as its largest shard")
    return "\n".join(lines)


def _pending(checkpoint: Checkpoint, limit: int | None = None) -> Iterator[WorkItem]:
    """The pending items in run order, a page at a time; at most ``limit`` of them."""
    after, left = 0, limit
    while left is None or left > 0:
        page = checkpoint.pending(after, 1000 if left is None else min(1000, left))
        if not page:
            return
        yield from page
        after = page[-1].seq
        left = None if left is None else left - len(page)


async def count_duplicates(pending: Callable[[], Iterable[WorkItem]], checkpoint: Checkpoint, storage: Storage,
                           params_hash: str) -> tuple[int, int]:
    """(pending items, those of them whose content equals an earlier pending item's, or a succeeded
    one's whose output is still provably there, as the run's de-duplication requires before it
    copies). ``pending`` is walked twice: once for the sizes, once to compare items sharing one."""
    done = checkpoint.succeeded_hashes_by_size()
    sizes = Counter(item.size for item in pending())
    seen: set[str] = set()
    duplicates = 0
    for item in pending():
        if sizes[item.size] < 2 and item.size not in done:
            continue  # a unique size cannot have an identical twin: no need to read it
        # An S3 object's single-part ETag is its MD5: equal ETags and sizes are equal bytes without a GET
        # (a multipart ETag is not a content hash: such twins are counted as requests, an overestimate).
        digest = f"etag:{item.etag}" if item.etag and "-" not in item.etag and item.size not in done \
            else await storage.sources.sha256(item)
        if digest is None:
            continue
        if digest in seen or (digest in done.get(item.size, set()) and await _provable_copy(
                checkpoint, storage, digest, params_hash, item.key)):
            duplicates += 1
        seen.add(digest)
    return sum(sizes.values()), duplicates


async def _provable_copy(checkpoint: Checkpoint, storage: Storage, digest: str, params_hash: str, key: str) -> bool:
    for copy in checkpoint.succeeded_copies(digest, params_hash, key):
        if await storage.outputs.read_verified(copy.output_path, copy.output_bytes, copy.output_digest) is not None:
            return True
    return False


def render_plan(plan: Plan) -> str:
    """The human-readable plan (``--json`` prints :meth:`Plan.to_json` instead)."""
    lines = [
        f"plan for job {plan.job} ({plan.model_id}) — nothing is sent, nothing is changed",
        f"  files found       {plan.files_found} ({plan.new} new, {plan.changed} changed, {plan.unchanged} unchanged)",
        f"  already done      {plan.already_done}"
        + (f" ({plan.proven_done} proven by their outputs' own records)" if plan.proven_done else ""),
        f"  to process        {plan.to_process}",
        f"  requests          {plan.requests} ({plan.deduplicated} duplicates will be copied, not sent)",
    ]
    for title, reasons in (("will be skipped", plan.skipped_by_reason), ("will be refused", plan.refused_by_reason),
                           ("failed earlier", plan.failed_by_reason)):
        for reason, n in reasons.items():
            lines.append(f"  {title:<17} {n} {reason}")
    lines.append(f"  estimated cost    ${plan.estimated_cost_usd:.2f} at ${plan.price_per_image_usd:.2f}/image "
                 "(estimate; prices are not verified — see README)")
    duration = (f"{human_duration(plan.estimated_minutes * 60)} at {plan.requests_per_minute:.4g} requests/min"
                if plan.estimated_minutes is not None
                else "unknown: the rate is 'auto' and no rate is known yet (it starts at 60/min and finds the quota)")
    lines.append(f"  estimated time    {duration}")
    if plan.rate_basis and plan.estimated_minutes is not None:
        lines.append(f"  (auto starts at {plan.requests_per_minute:.4g}/min: {plan.rate_basis})")
    if plan.failed_by_reason:
        lines.append("  (failed items are not retried; add --retry-failed)")
    return "\n".join(lines)
