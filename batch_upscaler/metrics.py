"""Prometheus metrics for node_exporter's textfile collector, written from the checkpoint.

The file is rewritten atomically (temporary file + rename, as the collector requires) during the
run and at its end. All values are job totals from the checkpoint, so they survive restarts and
never go backwards between runs of the same job.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from batch_upscaler.checkpoint import Checkpoint

_HELP = {
    "batch_upscaler_images": ("gauge", "Images of the job by state."),
    "batch_upscaler_requests_total": ("counter", "InvokeModel attempts sent, all runs of the job."),
    "batch_upscaler_throttles_total": ("counter", "Attempts answered with a throttling error."),
    "batch_upscaler_retries_total": ("counter", "Attempts after an image's first one."),
    "batch_upscaler_requests_saved_total": ("counter", "Outputs copied from identical content instead of a request."),
    "batch_upscaler_estimated_cost_usd": ("gauge", "Estimated spend (attempts that may be billed x price)."),
    "batch_upscaler_last_success_timestamp_seconds": ("gauge", "Unix time of the last image that succeeded."),
}


def render_metrics(job: str, checkpoint: Checkpoint, price_usd: float) -> str:
    totals = checkpoint.totals()
    label = f'job="{_escape(job)}"'
    values: list[tuple[str, str, float]] = [
        ("batch_upscaler_images", f'{label},state="{state.value}"', float(n))
        for state, n in checkpoint.counts().items()
    ]
    values += [
        ("batch_upscaler_requests_total", label, totals["attempts"]),
        ("batch_upscaler_throttles_total", label, totals["throttles"]),
        ("batch_upscaler_retries_total", label, totals["retries"]),
        ("batch_upscaler_requests_saved_total", label, totals["deduplicated"]),
        ("batch_upscaler_estimated_cost_usd", label, round((totals["attempts"] - totals["throttles"]) * price_usd, 4)),
        ("batch_upscaler_last_success_timestamp_seconds", label, totals["last_success"]),
    ]
    lines: list[str] = []
    for name, (kind, text) in _HELP.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{n}{{{labels}}} {value:g}" for n, labels, value in values if n == name]
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, job: str, checkpoint: Checkpoint, price_usd: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render_metrics(job, checkpoint, price_usd))
        os.chmod(tmp, 0o644)  # the collector runs as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _escape(value: str) -> str:
    """A label value as the exposition format wants it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
