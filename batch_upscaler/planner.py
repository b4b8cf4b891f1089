"""``plan``: what a run would do now, without sending anything or changing the checkpoint.

It runs the run's own first half (recover, scan, ``--retry-failed``) inside a checkpoint
transaction that is rolled back, so its counts are the ones the run will see. Requests are the
pending items minus the ones de-duplication will copy: identical content needs identical size, so
only files whose size is shared are read and hashed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from batch_upscaler.checkpoint import Checkpoint, ItemState, WorkItem
from batch_upscaler.discovery import Discovery
from batch_upscaler.joblock import JobLock
from batch_upscaler.outputs import LocalOutputStore
from batch_upscaler.runner import resolve_sources
from batch_upscaler.scan import Scanner, file_sha256
from batch_upscaler.settings import JobSettings, RunOptions

log = logging.getLogger(__name__)


@dataclass
class Plan:
    job: str
    model_id: str
    files_found: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    already_done: int = 0
    to_process: int = 0
    deduplicated: int = 0
    requests: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # not retried without --retry-failed
    price_per_image_usd: float = 0.0
    estimated_cost_usd: float = 0.0
    requests_per_minute: float | None = None  # None: auto
    estimated_minutes: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_job(settings: JobSettings, options: RunOptions) -> Plan:
    """The plan for the next ``run`` with these options (takes the job lock: exit 4 if one runs)."""
    with JobLock(settings.lock_path, settings.name):
        checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
        try:
            with checkpoint.dry_run():
                return _plan(settings, options, checkpoint)
        finally:
            checkpoint.close()


def _plan(settings: JobSettings, options: RunOptions, checkpoint: Checkpoint) -> Plan:
    checkpoint.recover()
    roots = resolve_sources(settings)
    outputs = LocalOutputStore(settings.output_dir)
    discovery = Discovery(roots.values(), settings.exclude, prune=(settings.output_dir, settings.state_dir),
                          base_dir=settings.base_dir)
    summary = Scanner(settings, checkpoint, outputs, quiet=True).run(discovery)
    if options.retry_failed:
        checkpoint.retry_failed()
    counts = checkpoint.counts()
    pending = list(_pending(checkpoint))
    if options.limit is not None:
        pending = pending[: options.limit]
    duplicates = count_duplicates(pending, checkpoint, {spec: root for spec, root in roots.items()})
    requests = len(pending) - duplicates
    rpm = settings.limits.requests_per_minute
    return Plan(
        job=settings.name, model_id=settings.model_id, files_found=summary.discovered, new=summary.new,
        changed=summary.changed, unchanged=summary.unchanged, already_done=counts[ItemState.SUCCEEDED],
        to_process=len(pending), deduplicated=duplicates, requests=requests,
        skipped_by_reason=checkpoint.reasons(ItemState.SKIPPED), failed_by_reason=checkpoint.reasons(ItemState.FAILED),
        price_per_image_usd=settings.model.price_usd, estimated_cost_usd=round(requests * settings.model.price_usd, 2),
        requests_per_minute=rpm, estimated_minutes=round(requests / rpm, 3) if rpm else None,
    )


def _pending(checkpoint: Checkpoint) -> list[WorkItem]:
    items: list[WorkItem] = []
    while page := checkpoint.pending(items[-1].seq if items else 0, 1000):
        items.extend(page)
    return items


def count_duplicates(pending: list[WorkItem], checkpoint: Checkpoint, roots: dict[str, Any]) -> int:
    """Pending items whose content equals an earlier pending item's or a succeeded one's."""
    done = checkpoint.succeeded_hashes_by_size()
    sizes = Counter(item.size for item in pending)
    seen: set[str] = set()
    duplicates = 0
    for item in pending:
        if sizes[item.size] < 2 and item.size not in done:
            continue  # a unique size cannot have an identical twin: no need to read it
        try:
            digest = file_sha256(roots[item.source].path_of(item.fs_relpath))
        except OSError:
            continue
        if digest in seen or digest in done.get(item.size, set()):
            duplicates += 1
        seen.add(digest)
    return duplicates


def _human(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def render_plan(plan: Plan) -> str:
    """The human-readable plan (``--json`` prints :meth:`Plan.to_json` instead)."""
    lines = [
        f"plan for job {plan.job} ({plan.model_id}) — nothing is sent, nothing is changed",
        f"  files found       {plan.files_found} ({plan.new} new, {plan.changed} changed, {plan.unchanged} unchanged)",
        f"  already done      {plan.already_done}",
        f"  to process        {plan.to_process}",
        f"  requests          {plan.requests} ({plan.deduplicated} duplicates will be copied, not sent)",
    ]
    for title, reasons in (("will be skipped", plan.skipped_by_reason), ("failed earlier", plan.failed_by_reason)):
        for reason, n in reasons.items():
            lines.append(f"  {title:<17} {n} {reason}")
    lines.append(f"  estimated cost    ${plan.estimated_cost_usd:.2f} at ${plan.price_per_image_usd:.2f}/image "
                 "(estimate; prices are not verified — see README)")
    duration = (f"{_human(plan.estimated_minutes)} at {plan.requests_per_minute:g} requests/min"
                if plan.estimated_minutes is not None else "unknown: the rate is 'auto' (it starts at 30/min)")
    lines.append(f"  estimated time    {duration}")
    if plan.failed_by_reason:
        lines.append("  (failed items are not retried; add --retry-failed)")
    return "\n".join(lines)
