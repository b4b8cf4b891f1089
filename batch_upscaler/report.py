"""The report stage: report.json, report.md and items.csv, written from the checkpoint alone.

Because it reads only the checkpoint, the report is the same whether it is written at the end of
a run, after an interruption, or later by ``batch-upscaler report``. Items are streamed into
report.json and items.csv (a 100k-item job never holds its items in memory); every file is
written to a temporary name and renamed, so a reader never sees half a report.

File names and messages are hostile text: an items.csv cell that a spreadsheet would run as a
formula gets a leading ``'`` (OWASP's advice), and report.md shows names in code spans and escapes
every other Markdown-significant character, so no name can become a link, an image or HTML.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.countstats import counted_stats
from batch_upscaler.discovery import printable
from batch_upscaler.htmlreport import render_html
from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.local import new_file_mode
from batch_upscaler.storage.names import Names

log = logging.getLogger(__name__)
CSV_COLUMNS = ("source", "output", "status", "input_width", "input_height", "sent_width", "sent_height",
               "output_width", "output_height", "scale_factor", "attempts", "throttles", "dedup_of",
               "error_code", "error_message")
_MD_LIST_LIMIT = 50
_NO_SIZE = (None, None)
_ITEM_JSON = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps builds one per call
_MD_MESSAGE_CHARS = 160
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # OWASP CSV injection: what a spreadsheet may evaluate
# Inline Markdown (CommonMark, and GFM's strikethrough, tables and bare URL/e-mail autolinks) needs one of these.
_MD_SPECIAL = frozenset("\\`*_[]<>&|~#:@!")


@dataclass
class Summary:
    """Aggregates of the checkpoint, computed in one pass before items are streamed."""

    totals: dict[str, int] = field(default_factory=dict)
    scale_factors: Counter[float] = field(default_factory=Counter)  # factor -> items (flat however many)
    # reason -> first few (file name, message): bounded however many items share a reason
    failures: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    skips: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    reason_counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    attempts: int = 0
    throttled_attempts: int = 0
    requests_saved: int = 0  # outputs copied from an identical image instead of a request
    possibly_billed: int = 0  # attempts sent whose answer never arrived (time-outs, crashes, cancels)

    def scale_stats(self) -> dict[str, float | None]:
        stats = counted_stats(self.scale_factors)
        if stats is None:
            return {"min": None, "median": None, "max": None, "mean": None}
        return {"min": round(stats.min, 4), "median": round(stats.median, 4), "max": round(stats.max, 4),
                "mean": round(stats.mean, 4)}


class ReportWriter:
    def __init__(self, settings: JobSettings, checkpoint: Checkpoint, names: Names | None = None) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.names = names or Names(settings)  # the merge passes names that are already display strings

    def write(self, directory: Path | None = None) -> Path:
        """Write every report file into ``directory`` (default: the local report_dir); returns it.
        An S3 report_dir is written to a local folder first, then published (storage.Reports)."""
        summary = self._summarise()
        header = self._header(summary)
        if directory is None:
            assert isinstance(self.settings.report_dir, Path), "an S3 report_dir is written via storage.Reports"
            directory = self.settings.report_dir
        directory.mkdir(parents=True, exist_ok=True)
        with (_atomic(directory / "report.json") as js, _atomic(directory / "items.csv") as cs,
              _atomic(directory / "failed.txt") as failed):
            self._stream_items(header, js, cs, failed)
        with _atomic(directory / "report.md") as md:
            md.write(render_markdown(header, summary))
        try:
            page_html = render_html(self.settings, self.checkpoint, header, names=self.names)
        except Exception:  # the page is for looking at; a bug in it must not cost the run's outcome
            log.exception("report.html could not be written; report.json, report.md and items.csv are complete")
        else:
            with _atomic(directory / "report.html") as page:
                page.write(page_html)
        return directory

    def _summarise(self) -> Summary:
        checkpoint = self.checkpoint
        summary = Summary(totals={s.value: n for s, n in checkpoint.counts().items()})
        (summary.attempts, summary.throttled_attempts, summary.requests_saved,
         summary.possibly_billed) = checkpoint.report_sums()
        for width, output_width, n in checkpoint.size_pairs():
            summary.scale_factors[round(float(output_width) / float(width), 4)] += n
        for state, bucket in ((ItemState.FAILED, summary.failures), (ItemState.SKIPPED, summary.skips)):
            for reason, n in checkpoint.reasons(state).items():
                summary.reason_counts[f"{state.value}:{reason}"] = n
                bucket[reason] = [(self._source_display(row), _short_message(reason, row["error_message"]))
                                  for row in checkpoint.first_with_reason(state, reason, _MD_LIST_LIMIT)]
        summary.totals["discovered"] = sum(summary.totals.values())
        return summary

    def _header(self, summary: Summary) -> dict[str, Any]:
        runs = self.checkpoint.runs()
        last = runs[-1] if runs else {}
        return {
            "job": self.settings.name,
            "model": self.settings.model.name.value,
            "model_id": self.settings.model_id,
            "backend": self.settings.backend.value,
            "started_at": _iso(last.get("started_at")),
            "finished_at": _iso(last.get("finished_at")),
            "totals": {k: summary.totals.get(k, 0) for k in
                       ("discovered", "succeeded", "failed", "skipped", "pending", "in_progress")},
            "requests": summary.attempts,
            "throttled_attempts": summary.throttled_attempts,
            "requests_saved_by_dedup": summary.requests_saved,
            # Sent, and may have run (and been billed), but no usable answer arrived: counted apart.
            "possibly_billed_not_received": summary.possibly_billed,
            # Throttled attempts never reached the model; every other attempt may have been billed.
            "estimated_cost_usd": round((summary.attempts - summary.throttled_attempts)
                                        * self.settings.model.price_usd, 2),
            "scale_factor": summary.scale_stats(),
            "failures_by_reason": {k: summary.reason_counts[f"failed:{k}"] for k in sorted(summary.failures)},
            "skips_by_reason": {k: summary.reason_counts[f"skipped:{k}"] for k in sorted(summary.skips)},
            "runs": len(runs),
            "last_run_spent_usd": round(last.get("spent_usd") or 0.0, 2),
            # The rate the last run ended at: with ``auto``, what the quota was found to allow.
            # With ``auto``: where it started (a remembered rate or the applied quota; null: cold) and
            # the rate it left for the next run (ratememory.py).
            "rate": {"mode": last.get("rate_mode"),
                     "final_rpm": round(last["final_rpm"], 1) if last.get("final_rpm") else None,
                     "start_rpm": round(last["start_rpm"], 1) if last.get("start_rpm") else None,
                     "remembered_rpm": round(last["remembered_rpm"], 1) if last.get("remembered_rpm") else None,
                     "measured": None if last.get("rate_measured") is None else bool(last["rate_measured"])},
            # Why the last run ended early, when it did (a signal, a cap, an outage, a full disk).
            "stopped": last.get("stop_reason"),
            # The last run's S3 requests (listings, probes, reads, uploads) and how many were retried.
            "s3": ({"requests": last.get("s3_requests"), "retried": last.get("s3_retries")}
                   if last.get("s3_requests") is not None else None),
        }

    def _stream_items(self, header: dict[str, Any], js: IO[str], cs: IO[str], failed: IO[str]) -> None:
        """One pass over the items feeds report.json, items.csv and failed.txt."""
        js.write(json.dumps(header, indent=2)[:-2] + ',\n  "items": [')
        table = csv.writer(cs)
        table.writerow(CSV_COLUMNS)
        for n, row in enumerate(self.checkpoint.items()):
            item = self._item(row)
            js.write(("," if n else "") + "\n    " + _ITEM_JSON.encode(item))
            # Only text can start a formula: numbers and the state go as they are.
            table.writerow((
                csv_cell(item["source"]), csv_cell(item["output"]), item["status"],
                *(item["input_size"] or _NO_SIZE), *(item["sent_size"] or _NO_SIZE),
                *(item["output_size"] or _NO_SIZE), item["scale_factor"], item["attempts"], item["throttles"],
                csv_cell(item["dedup_of"]), csv_cell(item["error_code"]), csv_cell(item["error_message"])))
            if row["state"] == ItemState.FAILED:
                failed.write(f"{printable(item['source'])}\n")
        js.write("\n  ]\n}\n")

    def _item(self, row: dict[str, Any]) -> dict[str, Any]:
        succeeded = row["state"] == ItemState.SUCCEEDED
        return {
            "source": self._source_display(row),
            "output": self.names.output_location(row["output_path"]) if succeeded else None,
            "status": row["state"],
            "input_size": [row["width"], row["height"]] if row["width"] else None,
            "sent_size": [row["sent_width"], row["sent_height"]] if row["sent_width"] else None,
            "output_size": [row["output_width"], row["output_height"]] if row["output_width"] else None,
            "scale_factor": _scale_factor(row),
            "attempts": row["attempts"],
            "throttles": row["throttles"],
            "dedup_of": row["dedup_of"],
            "error_code": row["error_code"],
            "error_message": row["error_message"],
            "possibly_billed": row["possibly_billed"],
            "finished_at": _iso(row["finished_at"]),
        }

    def _source_display(self, row: dict[str, Any]) -> str:
        return self.names.item(row["source"], row["relpath"], row["key"])


def _scale_factor(row: dict[str, Any]) -> float | None:
    if row["state"] != ItemState.SUCCEEDED or not row["width"] or not row["output_width"]:
        return None
    return round(float(row["output_width"]) / float(row["width"]), 4)


def csv_cell(value: object) -> object:
    """One items.csv cell: text a spreadsheet would evaluate (``=``, ``+``, ``-``, ``@``, tab, CR first)
    gets a leading ``'``; numbers and empty cells are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def md_code(text: str) -> str:
    """``text`` as a CommonMark code span: fenced by one backtick more than its longest backtick run,
    and padded with a space each side when it starts or ends with a backtick or a space."""
    text = printable(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.strip(" ") and (text[0] in "` " or text[-1] in "` ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(text: str) -> str:
    """``text`` as literal Markdown text: control characters shown, significant characters backslash-escaped.

    An ``_`` between two letters or digits is left alone (it can neither open nor close emphasis),
    and ``.`` only after ``www`` (GFM links ``www.`` names), so ordinary reason codes stay readable.
    """
    text = printable(text)
    out: list[str] = []
    for i, c in enumerate(text):
        intraword = c == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        www = c == "." and text[max(0, i - 3):i].lower() == "www"
        out.append("\\" + c if (c in _MD_SPECIAL and not intraword) or www else c)
    return "".join(out)


def _short_message(code: str, message: str | None) -> str:
    """An item's message for report.md: without its reason code in front, and at most one short line."""
    text = message or ""
    text = text.removeprefix(f"{code}: ")
    return text if len(text) <= _MD_MESSAGE_CHARS else text[:_MD_MESSAGE_CHARS - 1] + "…"


def render_markdown(header: dict[str, Any], summary: Summary) -> str:
    t = header["totals"]
    out = io.StringIO()
    out.write(f"# Upscale report: {md_text(header['job'])}\n\n")
    out.write(f"Model **{md_text(header['model'])}** ({md_code(header['model_id'])}) via "
              f"{md_text(header['backend'])}; last run {header['started_at']} → {header['finished_at']}.\n\n")
    out.write("| discovered | succeeded | failed | skipped | pending | requests | throttled | saved by dedup "
              "| possibly billed, not received | est. cost |\n")
    out.write("|---|---|---|---|---|---|---|---|---|---|\n")
    out.write(f"| {t['discovered']} | {t['succeeded']} | {t['failed']} | {t['skipped']} | "
              f"{t['pending'] + t['in_progress']} | {header['requests']} | {header['throttled_attempts']} | "
              f"{header['requests_saved_by_dedup']} | {header.get('possibly_billed_not_received', 0)} | "
              f"${header['estimated_cost_usd']:.2f} (estimate) |\n\n")
    if header.get("stopped"):
        out.write(f"**Stopped:** {md_text(header['stopped'])}. Run the job again to resume.\n\n")
    sf = header["scale_factor"]
    if sf["median"] is not None:
        out.write(f"Scale factor (output width / input width): min {sf['min']}, median {sf['median']}, "
                  f"mean {sf['mean']}, max {sf['max']}.\n\n")
    for title, state, groups in (("Failures", "failed", summary.failures), ("Skipped", "skipped", summary.skips)):
        if not groups:
            continue
        out.write(f"## {title} by reason\n\n")
        for reason, files in sorted(groups.items()):
            count = summary.reason_counts[f"{state}:{reason}"]
            out.write(f"### {md_text(reason)} ({count})\n\n")
            out.writelines(f"- {md_code(name)}" + (f": {md_text(message)}" if message else "") + "\n"
                           for name, message in files)
            if count > len(files):
                out.write(f"- … and {count - len(files)} more (see items.csv)\n")
            out.write("\n")
    return out.getvalue()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def write_json_atomically(path: Path, document: Any) -> None:
    """A small JSON file, replaced whole (a reader never sees half of it)."""
    with _atomic(path) as out:
        out.write(json.dumps(document, indent=2) + "\n")


@contextmanager
def _atomic(path: Path) -> Iterator[IO[str]]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_report(settings: JobSettings, checkpoint: Checkpoint) -> str:
    """``batch-upscaler report``: the report rewritten from the checkpoint and published where
    report_dir says (a local folder, or an S3 prefix); returns where it is."""
    import asyncio

    from aiobotocore.session import AioSession

    from batch_upscaler.storage.edge import open_storage

    async def write_and_publish() -> str:
        async with open_storage(settings, AioSession(profile=settings.profile)) as storage:
            ReportWriter(settings, checkpoint).write(storage.reports.local_dir)
            return await storage.reports.publish()

    return asyncio.run(write_and_publish())
