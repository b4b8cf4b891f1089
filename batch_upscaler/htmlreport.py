"""The HTML report: render report.html, one self-contained page a person looks at after a run.

Its one job is turning the checkpoint (plus the header that report.py computed for report.json)
into a single HTML document with no external assets and no JavaScript: inline CSS, inline SVG
charts (throughput over time, scale-factor histogram), failures and skips grouped by reason, and
before/after thumbnails embedded as small JPEG data URIs. A Content-Security-Policy forbids the
page every network load, so opening it can never reach out. Items are streamed from the
checkpoint once; only bounded aggregates and the thumbnail sample (thumbnails.py) are held.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import os
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_upscaler.checkpoint import Checkpoint, ItemState
from batch_upscaler.countstats import counted_stats
from batch_upscaler.discovery import printable
from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.names import Names
from batch_upscaler.thumbnails import SAMPLE_SIZE, THUMB_PX, StableSample, ThumbnailCache, version

GROUP_LIST_LIMIT = 200  # files listed per failure/skip reason; the rest are counted (items.csv has all)
_MESSAGE_CHARS = 160
_MAX_BARS = 180
_SLOT_S = 10  # finish times are counted per 10-second slot; bins are whole slots
_NICE_TICKS_S = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
_NICE_SLOTS = (1, 2, 3, 6, 12, 30, 60, 90, 180, 360, 720, 1080, 2160, 4320, 8640)
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class _Group:
    """One failure or skip reason: its count and the first files (bounded)."""

    count: int = 0
    rows: list[tuple[str, str]] = field(default_factory=list)  # (file, message)


@dataclass
class _Aggregates:
    """What one streamed pass over the items collects (bounded: per reason, per 10-s slot, per factor)."""

    done_per_slot: Counter[int] = field(default_factory=Counter)  # 10-second slot -> items finished
    failed_per_slot: Counter[int] = field(default_factory=Counter)
    factors: Counter[float] = field(default_factory=Counter)
    failures: dict[str, _Group] = field(default_factory=dict)
    skips: dict[str, _Group] = field(default_factory=dict)
    succeeded: int = 0
    sample: StableSample = field(default_factory=StableSample)
    samples: list[dict[str, Any]] = field(default_factory=list)  # the sample's items, whole, in seq order


class _Names:
    """Display names and on-disk paths of items (as report.py shows them)."""

    def __init__(self, settings: JobSettings, names: Names | None = None) -> None:
        self.names = names or Names(settings)

    def display(self, row: Mapping[str, Any]) -> str:
        return self.names.item(row["source"], row["relpath"], row.get("key"))

    def source_path(self, row: Mapping[str, Any]) -> Path | None:
        raw = row.get("raw_relpath")
        return self.names.local_source(row["source"], os.fsdecode(raw) if raw is not None else row["relpath"])

    def output_path(self, row: Mapping[str, Any]) -> Path | None:
        return self.names.local_output(row["output_path"]) if row["output_path"] else None


def render_html(settings: JobSettings, checkpoint: Checkpoint, header: Mapping[str, Any], *,
                names: Names | None = None, sample_size: int = SAMPLE_SIZE, thumb_px: int = THUMB_PX) -> str:
    """The whole report.html document for ``settings``' job, as one string."""
    shown = _Names(settings, names)
    agg = _aggregate(checkpoint, shown, StableSample(sample_size))
    body = [
        _summary_section(header, checkpoint.runs()),
        _throughput_section(agg),
        _histogram_section(agg),
        _groups_section("Failures by reason", "failed", agg.failures),
        _groups_section("Skipped by reason", "skipped", agg.skips),
        _thumbs_section(agg.samples, agg.succeeded, settings, shown, thumb_px),
    ]
    return _document(header, thumb_px, "".join(body))


# ---- data ------------------------------------------------------------------------------------
def _aggregate(checkpoint: Checkpoint, names: _Names, sample: StableSample) -> _Aggregates:
    """Counts come from SQL; only the succeeded items are walked, for the stable picture sample."""
    agg = _Aggregates(sample=sample)
    agg.done_per_slot.update(checkpoint.finished_per_slot(ItemState.SUCCEEDED, _SLOT_S))
    agg.failed_per_slot.update(checkpoint.finished_per_slot(ItemState.FAILED, _SLOT_S))
    for width, output_width, n in checkpoint.size_pairs():
        agg.factors[round(output_width / width, 3)] += n
    for state, groups in ((ItemState.FAILED, agg.failures), (ItemState.SKIPPED, agg.skips)):
        for reason, count in checkpoint.reasons(state).items():
            rows = checkpoint.first_with_reason(state, reason, GROUP_LIST_LIMIT)
            groups[reason] = _Group(count, [(names.display(row), _short_message(row)) for row in rows])
    agg.succeeded = checkpoint.counts()[ItemState.SUCCEEDED]
    if sample.size:  # the sample needs only each key and seq; the chosen few are read whole
        for key, seq in checkpoint.keys_in(ItemState.SUCCEEDED):
            sample.offer({"key": key, "seq": seq})
        agg.samples = checkpoint.items_with_keys(row["key"] for row in sample.rows())
    return agg


def _short_message(row: Mapping[str, Any]) -> str:
    message = str(row["error_message"] or "")
    prefix = f"{row['error_code']}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS - 1] + "…"


# ---- document and summary --------------------------------------------------------------------
def _e(text: object) -> str:
    """``text`` safe inside HTML text and attributes: control characters shown, markup escaped."""
    return html.escape(printable(str(text)), quote=True)


def _document(header: Mapping[str, Any], thumb_px: int, body: str) -> str:
    title = f"Upscale report: {header['job']}"
    meta = (f"Model <b>{_e(header['model'])}</b> (<code>{_e(header['model_id'])}</code>) via "
            f"{_e(header['backend'])}; last run {_e(_when(header['started_at']))} → "
            f"{_e(_when(header['finished_at']))} UTC, {_e(header['runs'])} run(s) in all.")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_css(thumb_px)}</style></head>\n"
            f"<body><main><h1>{_e(title)}</h1><p class=\"meta\">{meta}</p>\n{body}"
            f'<footer>Written from the checkpoint by batch-upscaler. Every item is in '
            f'<a href="items.csv">items.csv</a> and <a href="report.json">report.json</a>.</footer>'
            f"</main></body></html>\n")


def _css(px: int) -> str:
    return (
        ":root{color-scheme:light;--ok:#2f8a57;--bad:#c43d33;--skip:#b7791f;--ink:#1d2330;--mute:#667085;"
        "--line:#e3e6eb}"
        "body{margin:0;background:#f6f7f9;color:var(--ink);font:14px/1.45 system-ui,-apple-system,"
        "'Segoe UI',Roboto,sans-serif}"
        "main{max-width:1180px;margin:0 auto;padding:24px 28px 40px}"
        "h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:14px 0 10px}"
        "h2 small,.muted,.meta,figcaption,footer{color:var(--mute);font-weight:normal}"
        "code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace}"
        "section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:4px 18px 16px;"
        "margin-top:18px}"
        ".cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:10px;margin-top:18px}"
        ".card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:10px 14px}"
        ".card b{display:block;font-size:20px;white-space:nowrap;font-variant-numeric:tabular-nums}"
        ".card span{color:var(--mute)}"
        ".card.ok b{color:var(--ok)}.card.bad b{color:var(--bad)}.card.skip b{color:var(--skip)}"
        "svg{display:block;width:100%;height:auto}svg text{font-size:12px;fill:var(--mute)}"
        ".grid{stroke:var(--line)}.ok{fill:var(--ok)}.bad{fill:var(--bad)}.bar{fill:#4a6fa5}"
        ".median{stroke:var(--ink);stroke-dasharray:4 3}"
        "details{border-top:1px solid var(--line);padding:6px 0}summary{cursor:pointer;font-weight:600}"
        "summary .n{color:var(--mute);font-weight:normal}"
        ".files{list-style:none;margin:6px 0 0 18px;padding:4px 10px;max-height:260px;overflow:auto;"
        "border:1px solid var(--line);border-radius:6px;background:#fbfbfc}"
        ".files li{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}"
        ".files .m{color:var(--mute);margin-left:8px}.more{color:var(--mute);margin:4px 0 0 18px}"
        f".pairs{{display:grid;grid-template-columns:repeat(auto-fill,{2 * px + 8}px);gap:18px 28px;"
        "justify-content:space-between}"
        "figure{margin:0;min-width:0}.imgs{display:flex;gap:8px}"
        f".box{{position:relative;width:{px}px;height:{px}px;flex:none;display:flex;align-items:center;"
        "justify-content:center;background:#eceef2;border-radius:6px;overflow:hidden}"
        ".box img{width:100%;height:100%;object-fit:contain}"
        ".box .tag{position:absolute;left:4px;top:4px;font-size:11px;background:rgba(0,0,0,.55);color:#fff;"
        "padding:0 5px;border-radius:4px}"
        ".ph{color:var(--mute);font-size:12px}"
        "figcaption{font-size:12px;margin-top:4px;overflow:hidden}"
        "figcaption .f{display:block;color:var(--ink);white-space:nowrap;overflow:hidden;text-overflow:ellipsis}"
        "footer{margin-top:28px;font-size:12px}"
    )


def _summary_section(header: Mapping[str, Any], runs: list[dict[str, Any]]) -> str:
    totals = header["totals"]
    rate = header.get("rate") or {}
    final = f"{rate['final_rpm']:g}/min" if rate.get("final_rpm") else "—"
    cards = [
        ("ok", totals["succeeded"], "done"), ("bad", totals["failed"], "failed"),
        ("skip", totals["skipped"], "skipped"), ("", totals["pending"] + totals["in_progress"], "pending"),
        ("", header["requests"], "requests"), ("", header["throttled_attempts"], "throttled"),
        ("", header["requests_saved_by_dedup"], "saved by dedup"),
        ("", header.get("possibly_billed_not_received", 0), "possibly billed, not received"),
        ("", f"${header['estimated_cost_usd']:.2f}", "cost (estimate)"),
        ("", *_run_time(runs)),
        ("", final, f"final rate ({rate['mode']})" if rate.get("mode") else "final rate"),
    ]
    items = "".join(f'<div class="card{" " + kind if kind else ""}"><b>{_e(value)}</b><span>{_e(label)}</span></div>'
                    for kind, value, label in cards)
    stopped = (f'<p class="stopped" id="stopped"><b>Stopped:</b> {_e(header["stopped"])}. '
               "Run the job again to resume.</p>\n" if header.get("stopped") else "")
    return f'<div class="cards" id="summary">{items}</div>\n{stopped}'


def _run_time(runs: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """The summed duration of the finished runs, and the card's label."""
    runs = list(runs)
    finished = [r for r in runs if r.get("finished_at") is not None]
    if not finished:
        return "—", "run time"
    total = sum(r["finished_at"] - r["started_at"] for r in finished)
    unfinished = len(runs) - len(finished)
    label = "run time" + (f", {len(finished)} runs" if len(finished) > 1 else "")
    return _duration(total), label + (f" (+{unfinished} unfinished)" if unfinished else "")


def _when(iso: str | None) -> str:
    """An ISO timestamp from the header as ``2026-01-01 07:15:12`` (UTC)."""
    return "—" if not iso else iso.replace("T", " ").removesuffix("+00:00")


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60:02d} s" if s % 60 else "")
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# ---- charts ----------------------------------------------------------------------------------
_W, _H, _L, _R, _T, _B = 960, 240, 52, 14, 22, 32
_LABEL_PX = 12 * 0.7  # a generous width of one label character (svg text is 12 px; digits are ~0.55 em)


def _nice_ceiling(value: float, *, whole: bool = False) -> float:
    """A round axis top at or above ``value``; ``whole`` keeps its half a whole number too."""
    if whole and value <= 2:
        return 2.0
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    steps = (1, 2, 4, 10) if whole else (1, 2, 2.5, 5, 10)
    return next(m * scale for m in steps if value <= m * scale * (1 + 1e-9))


def _num(value: float) -> str:
    return f"{round(value, 6):g}"


def _svg(label: str, parts: Iterable[str]) -> str:
    return f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(label)}">{"".join(parts)}</svg>'


def _y_axis(top: float) -> Iterable[str]:
    height = _H - _T - _B
    for frac in (0.0, 0.5, 1.0):
        y = _T + height * (1 - frac)
        yield f'<line class="grid" x1="{_L}" y1="{y:.1f}" x2="{_W - _R}" y2="{y:.1f}"/>'
        yield f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(top * frac)}</text>'


def _x_label(x: float, text: str) -> str:
    """An x-axis label centred under ``x``, or ending (starting) at ``x`` where centring it would
    cross the right (left) edge of the viewBox and clip it: the last tick sits on the right edge."""
    half = len(text) * _LABEL_PX / 2
    anchor = "end" if x + half > _W else "start" if x - half < 0 else "middle"
    return f'<text x="{x:.1f}" y="{_H - 10}" text-anchor="{anchor}">{_e(text)}</text>'


def _median_label(x: float, text: str) -> str:
    """The median line's label: right of the line, or left of it when it would run off the right edge."""
    if x + 4 + len(text) * _LABEL_PX > _W:
        return f'<text x="{x - 4:.1f}" y="{_T - 6}" text-anchor="end">{_e(text)}</text>'
    return f'<text x="{x + 4:.1f}" y="{_T - 6}">{_e(text)}</text>'


def _bar(x: float, y: float, w: float, h: float, cls: str, tip: str) -> str:
    return (f'<rect class="{cls}" x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.5):.1f}" height="{h:.1f}">'
            f"<title>{_e(tip)}</title></rect>")


def _bin_slots(span: int) -> int:
    """The bin width, in 10-second slots, giving at most ``_MAX_BARS`` bars over ``span`` slots."""
    return next((w for w in _NICE_SLOTS if span / w <= _MAX_BARS), math.ceil(span / _MAX_BARS))


def _throughput_section(agg: _Aggregates) -> str:
    slots = agg.done_per_slot.keys() | agg.failed_per_slot.keys()
    intro = '<section id="throughput"><h2>Throughput <small>items finished per minute (UTC)</small></h2>'
    if not slots:
        return intro + '<p class="muted">No item has been sent and finished yet.</p></section>\n'
    first, last = min(slots), max(slots)
    width = _bin_slots(last - first + 1)
    bins = (last - first) // width + 1
    ok, bad = [0] * bins, [0] * bins
    for counter, series in ((agg.done_per_slot, ok), (agg.failed_per_slot, bad)):
        for slot, n in counter.items():
            series[(slot - first) // width] += n
    total, minutes = sum(ok) + sum(bad), len({slot // 6 for slot in slots})
    peak = max(o + b for o, b in zip(ok, bad, strict=True)) * 60 / (width * _SLOT_S)
    note = (f"{total} finished ({sum(bad)} failed) in bins of {_duration(width * _SLOT_S)}; "
            f"peak {_num(round(peak, 1))}/min, mean {_num(round(total / minutes, 1))}/min over the "
            f"{minutes} minute(s) in which items finished.")
    chart = _svg("items finished per minute", _throughput_parts(first, width, ok, bad))
    return f'{intro}{chart}<p class="muted">{_e(note)}</p></section>\n'


def _throughput_parts(first: int, width: int, ok: list[int], bad: list[int]) -> Iterable[str]:
    per_minute = 60 / (width * _SLOT_S)  # count in a bin -> items per minute
    top = _nice_ceiling(max(o + b for o, b in zip(ok, bad, strict=True)) * per_minute)
    height, slot = _H - _T - _B, (_W - _L - _R) / max(len(ok), 12)
    yield from _y_axis(top)
    for i, (good, failed) in enumerate(zip(ok, bad, strict=True)):
        start = (first + i * width) * _SLOT_S
        x, h_ok, h_bad = _L + i * slot, height * good * per_minute / top, height * failed * per_minute / top
        when = _clock(start, width * _SLOT_S)
        if good:
            yield _bar(x, _T + height - h_ok, slot * 0.88, h_ok, "ok", f"{when}: {good} done")
        if failed:
            yield _bar(x, _T + height - h_ok - h_bad, slot * 0.88, h_bad, "bad", f"{when}: {failed} failed")
    yield from _time_ticks(first * _SLOT_S, len(ok) * width * _SLOT_S, slot / (width * _SLOT_S))


def _time_ticks(start: int, span: int, px_per_s: float) -> Iterable[str]:
    """Labels at round times (every 1 min ... 1 day), at most about seven of them."""
    step = next((s for s in _NICE_TICKS_S if span / s <= 7), 86400 * math.ceil(span / 86400 / 7))
    fmt = "%m-%d %H:%M" if span >= 86400 else "%H:%M" if step >= 60 else "%H:%M:%S"
    for tick in range(-(-start // step) * step, start + span + 1, step):
        yield _x_label(_L + (tick - start) * px_per_s, _timestamp(tick, fmt))


def _timestamp(ts: float, fmt: str) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime(fmt)


def _clock(start: float, seconds: int) -> str:
    return f"{_timestamp(start, '%Y-%m-%d %H:%M:%S')}–{_timestamp(start + seconds, '%H:%M:%S')}"


def _histogram_section(agg: _Aggregates) -> str:
    intro = ('<section id="scale"><h2>Scale factors <small>output width ÷ input width, '
             'succeeded items</small></h2>')
    if not agg.factors:
        return intro + '<p class="muted">No succeeded item with known sizes.</p></section>\n'
    stats = counted_stats(agg.factors)
    assert stats is not None  # agg.factors is not empty
    note = (f"min {_num(stats.min)}×, median {_num(round(stats.median, 3))}×, "
            f"mean {_num(round(stats.mean, 3))}×, max {_num(stats.max)}× over {stats.n} image(s).")
    chart = _svg("histogram of scale factors", _histogram_parts(agg.factors, stats.median))
    return f'{intro}{chart}<p class="muted">{_e(note)}</p></section>\n'


def _histogram_parts(factors: Counter[float], median: float) -> Iterable[str]:
    lo, hi = min(factors), max(factors)
    step = _nice_ceiling(max(hi - lo, 1e-3) / 20)
    lo = math.floor(lo / step + 1e-9) * step
    bins = int((hi - lo) / step + 1e-9) + 1
    counts = [0] * bins
    for value, n in factors.items():
        counts[min(bins - 1, int((value - lo) / step + 1e-9))] += n
    top = _nice_ceiling(max(counts), whole=True)
    height, slot = _H - _T - _B, (_W - _L - _R) / bins
    yield from _y_axis(top)
    for i, n in enumerate(counts):
        if n:
            h = height * n / top
            edge = f"{_num(lo + i * step)}×–{_num(lo + (i + 1) * step)}×"
            yield _bar(_L + i * slot + 1, _T + height - h, slot - 2, h, "bar", f"{edge}: {n} image(s)")
    every = max(1, math.ceil(bins / 10))
    for i in range(0, bins + 1, every):
        yield _x_label(_L + i * slot, f"{_num(lo + i * step)}×")
    x = _L + (median - lo) / step * slot
    yield f'<line class="median" x1="{x:.1f}" y1="{_T}" x2="{x:.1f}" y2="{_T + height}"/>'
    yield _median_label(x, f"median {_num(round(median, 3))}×")


# ---- failure and skip lists ------------------------------------------------------------------
def _groups_section(title: str, state: str, groups: Mapping[str, _Group]) -> str:
    if not groups:
        return ""
    total = sum(g.count for g in groups.values())
    parts = [f'<section id="{state}"><h2>{_e(title)} <small>{total} item(s)</small></h2>']
    for reason, group in sorted(groups.items(), key=lambda kv: (-kv[1].count, kv[0])):
        rows = "".join(f'<li title="{_e(name)}">{_e(name)}<span class="m">{_e(message)}</span></li>'
                       for name, message in group.rows)
        more = group.count - len(group.rows)
        tail = (f'<p class="more">… and {more} more (see <a href="items.csv">items.csv</a>)</p>'
                if more > 0 else "")
        parts.append(f'<details open class="reason"><summary><code>{_e(reason)}</code> '
                     f'<span class="n">{group.count}</span></summary><ul class="files">{rows}</ul>{tail}</details>')
    parts.append("</section>\n")
    return "".join(parts)


# ---- thumbnails ------------------------------------------------------------------------------
def _thumbs_section(samples: list[dict[str, Any]], succeeded: int, settings: JobSettings, names: _Names,
                    px: int) -> str:
    if not samples:
        return ""
    figures = "".join(_pair(row, settings, names, px) for row in samples)
    note = f"{len(samples)} of {succeeded} succeeded (the same ones from run to run); click an output to open it"
    return (f'<section id="samples"><h2>Before / after <small>{_e(note)}</small></h2>'
            f'<div class="pairs">{figures}</div></section>\n')


def _pair(row: Mapping[str, Any], settings: JobSettings, names: _Names, px: int) -> str:
    name = names.display(row)
    output = names.output_path(row)
    cache = ThumbnailCache(settings.state_dir / "thumbnails", px)
    before = _box(row, "before", names.source_path(row), cache, name)
    after = _box(row, "after", output, cache, name)
    if output is not None and output.is_file() and isinstance(settings.report_dir, Path):
        href = urllib.parse.quote(Path(os.path.relpath(output, settings.report_dir)).as_posix(), safe="/")
        after = f'<a href="{html.escape(href, quote=True)}" title="open the full output">{after}</a>'
    sizes = f"{row['width']}×{row['height']} → {row['output_width']}×{row['output_height']}"
    if row["width"] and row["output_width"]:
        sizes += f" · {_num(round(row['output_width'] / row['width'], 2))}×"
    return (f'<figure class="pair"><div class="imgs">{before}{after}</div><figcaption>'
            f'<span class="f" title="{_e(name)}">{_e(name)}</span>{_e(sizes)}</figcaption></figure>')


def _box(row: Mapping[str, Any], tag: str, path: Path | None, cache: ThumbnailCache, name: str) -> str:
    """One picture: a local file's (made once, then cached), or the one the pool kept of an S3 object."""
    if path is None:
        uri = cache.of_item(row["key"], tag, version(row, tag))
        missing = "in S3, no picture kept" if uri is None else ""
    elif not path.is_file():
        uri, missing = None, "file missing"
    else:
        uri = cache.of_file(path)
        missing = "" if uri else "unreadable"
    inner = (f'<img src="{uri}" alt="{tag}: {_e(name)}">' if uri
             else f'<span class="ph">{tag}: {missing}</span>')
    return f'<div class="box"><span class="tag">{tag}</span>{inner}</div>'
