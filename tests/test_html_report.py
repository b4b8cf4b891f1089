"""report.html: built from a real run on the embedded emulator, checked as text and in headless Chromium.

The job has succeeded images, a too-small one (skipped), a zero-byte .jpg (failed) and a failing
file whose name holds markup, quotes and a newline. Chromium comes from the distribution's
packages (``.ci/run`` installs it); without it the browser tests fail rather than skip. Layout is
measured from outside the page over the DevTools protocol (DOM.getBoxModel): the page runs no script.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from PIL import Image

from batch_upscaler.checkpoint import Checkpoint, ItemState, Scanned
from batch_upscaler.cli import main
from batch_upscaler.htmlreport import render_html
from batch_upscaler.manifest import load_settings
from batch_upscaler.settings import JobSettings
from batch_upscaler.thumbnails import sample_rank
from tests.conftest import local_dir, manifest_doc, write_image

CHROMIUM = Path("/usr/bin/chromium")
ODD_NAME = 'odd <b>&"name"\nline.jpg'
SUCCEEDED = 6


@dataclass(frozen=True)
class Job:
    settings: JobSettings
    header: dict[str, Any]
    html_path: Path
    html: str


class _Links(HTMLParser):
    """Collects every URL-bearing attribute and counts tags."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.img_srcs: list[str] = []
        self.other_urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if tag == "a" and name == "href":
                self.hrefs.append(value or "")
            elif tag == "img" and name == "src":
                self.img_srcs.append(value or "")
            elif name in ("src", "href", "srcset", "action", "data", "poster"):
                self.other_urls.append(value or "")


def _render(settings: JobSettings, header: dict[str, Any], **kwargs: Any) -> str:
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name)
    try:
        return render_html(settings, checkpoint, header, **kwargs)
    finally:
        checkpoint.close()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    tmp = tmp_path_factory.mktemp("html-report")
    photos = tmp / "photos"
    for i in range(SUCCEEDED - 1):
        write_image(photos / f"img{i}.png", 96 + 16 * i, 80, color=(40 * i, 90, 200 - 30 * i))
    write_image(photos / "sub dir" / "pic é.jpg", 120, 90, fmt="JPEG", color=(200, 60, 30))
    write_image(photos / "tiny.png", 48, 48)  # skipped: too_small
    (photos / "empty.jpg").write_bytes(b"")  # failed: empty_file
    (photos / ODD_NAME).write_bytes(b"")  # failed: empty_file, with markup and a newline in its name
    manifest = tmp / "job.yaml"
    manifest.write_text(yaml.safe_dump(manifest_doc()))
    assert main(["run", str(manifest)]) == 1  # items failed
    settings = load_settings(manifest)
    report = json.loads((local_dir(settings.report_dir) / "report.json").read_text())
    header = {k: v for k, v in report.items() if k != "items"}
    html_path = local_dir(settings.report_dir) / "report.html"
    assert html_path.exists()  # every run writes it
    yield Job(settings, header, html_path, html_path.read_text(encoding="utf-8"))


def test_summary_figures_and_reasons(job: Job) -> None:
    html, totals = job.html, job.header["totals"]
    assert (totals["succeeded"], totals["failed"], totals["skipped"]) == (SUCCEEDED, 2, 1)
    for value, label in ((totals["succeeded"], "done"), (totals["failed"], "failed"),
                         (totals["skipped"], "skipped"), (job.header["requests"], "requests"),
                         (job.header["throttled_attempts"], "throttled"),
                         (job.header["requests_saved_by_dedup"], "saved by dedup"),
                         (f"${job.header['estimated_cost_usd']:.2f}", "cost (estimate)")):
        assert f"<b>{value}</b><span>{label}</span>" in html, label
    assert "<title>Upscale report: job</title>" in html
    assert "<code>empty_file</code>" in html and "<code>too_small</code>" in html
    assert "photos/empty.jpg" in html and "photos/tiny.png" in html and "48x48 &lt; 64 px" in html
    # the odd name is escaped (markup and quotes) and its newline shown as \n, never raw
    assert "photos/odd &lt;b&gt;&amp;&quot;name&quot;\\nline.jpg" in html
    assert "<b>&" not in html and "\nline.jpg" not in html
    assert html.count("<svg") == 2 and 'id="throughput"' in html and 'id="scale"' in html


def test_self_contained(job: Job) -> None:
    assert "http://" not in job.html and "https://" not in job.html
    assert "<script" not in job.html and "<link" not in job.html and "url(" not in job.html
    links = _Links()
    links.feed(job.html)
    assert links.other_urls == []
    assert all(src.startswith("data:image/jpeg;base64,") for src in links.img_srcs)


def test_thumbnails_are_small_jpegs(job: Job) -> None:
    links = _Links()
    links.feed(job.html)
    assert len(links.img_srcs) == 2 * SUCCEEDED  # before and after for each sampled item
    for src in links.img_srcs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "JPEG" and max(im.size) <= 160


def test_links_resolve_to_existing_files(job: Job) -> None:
    links = _Links()
    links.feed(job.html)
    outputs = [h for h in links.hrefs if h not in ("items.csv", "report.json")]
    assert len(outputs) == SUCCEEDED
    for href in links.hrefs:
        target = (local_dir(job.settings.report_dir) / urllib.parse.unquote(href)).resolve()
        assert target.is_file(), href
    resolved = {(local_dir(job.settings.report_dir) / urllib.parse.unquote(h)).resolve() for h in outputs}
    assert (local_dir(job.settings.output_dir) / "sub dir" / "pic é.png").resolve() in resolved


def test_sample_is_deterministic_and_bounded(job: Job) -> None:
    first = _render(job.settings, job.header, sample_size=3, thumb_px=64)
    assert first == _render(job.settings, job.header, sample_size=3, thumb_px=64)
    assert first.count('<figure class="pair">') == 3 and "width:64px;height:64px" in first
    names = re.findall(r'<span class="f" title="([^"]*)">', first)
    checkpoint = Checkpoint.open(job.settings.checkpoint_path, job.settings.name)
    try:
        rows = [row for row in checkpoint.items() if row["state"] == ItemState.SUCCEEDED]
    finally:
        checkpoint.close()
    lowest = sorted(rows, key=lambda row: sample_rank(row["key"]))[:3]  # the stable sample: smallest ranks
    assert names == [f"photos/{row['relpath']}" for row in sorted(lowest, key=lambda row: row["seq"])]


def test_missing_or_broken_outputs_get_placeholders(job: Job, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(local_dir(job.settings.output_dir), copy)
    (copy / "img0.png").write_bytes(b"not an image")
    (copy / "img1.png").unlink()
    html = _render(dataclasses.replace(job.settings, output_dir=copy), job.header)
    assert "after: unreadable" in html and "after: file missing" in html
    assert html.count("data:image/jpeg;base64,") == 2 * SUCCEEDED - 2


# ---- headless Chromium -----------------------------------------------------------------------
def _chromium(page: Path, profile: Path) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install the distribution's package "
                    "(apt-get install -y chromium), as .ci/run does")
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _page_errors(stderr: str) -> list[str]:
    """Console output (the page has no script: any message is a blocked load or an error)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_chromium_renders_the_report(job: Job, tmp_path: Path) -> None:
    result = _chromium(job.html_path, tmp_path / "profile")
    dom = result.stdout
    assert _page_errors(result.stderr) == [], result.stderr
    assert "<title>Upscale report: job</title>" in dom
    assert "<code>empty_file</code>" in dom and "<code>too_small</code>" in dom
    assert "photos/odd &lt;b&gt;&amp;" in dom and "<b>&amp;" not in dom
    assert dom.count('<img src="data:image/jpeg;base64,') == 2 * SUCCEEDED
    assert dom.count("<svg") == 2 and dom.count("<rect") >= 2


def test_chromium_error_detection_works(job: Job, tmp_path: Path) -> None:
    """The check above notices an external load: the page's own policy blocks it and Chromium logs it."""
    page = tmp_path / "bad.html"
    page.write_text(job.html.replace("<body>", '<body><img src="https://example.invalid/x.png">', 1))
    errors = _page_errors(_chromium(page, tmp_path / "profile").stderr)
    assert any("example.invalid" in line for line in errors), errors


def test_empty_checkpoint_renders(job: Job, tmp_path: Path) -> None:
    settings = dataclasses.replace(job.settings, state_dir=tmp_path)
    header = {**job.header, "runs": 0, "totals": dict.fromkeys(job.header["totals"], 0)}
    html = _render(settings, header)
    assert "No item has been sent and finished yet." in html and "<svg" not in html
    assert 'id="samples"' not in html and 'id="failed"' not in html


def test_long_groups_are_capped(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    from batch_upscaler import htmlreport

    monkeypatch.setattr(htmlreport, "GROUP_LIST_LIMIT", 1)
    html = _render(job.settings, job.header, sample_size=0)
    assert '… and 1 more (see <a href="items.csv">items.csv</a>)' in html  # empty_file: 2 files, 1 listed
    assert 'id="samples"' not in html


def test_thumbnails_are_cached_between_reports(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    import batch_upscaler.thumbnails as thumbnails

    first = _render(job.settings, job.header)
    assert list((job.settings.state_dir / "thumbnails").glob("*.txt"))

    def no_decoding(image: object, px: int) -> str | None:
        raise AssertionError(f"{image} was decoded again")

    monkeypatch.setattr(thumbnails, "make_thumbnail", no_decoding)
    assert _render(job.settings, job.header) == first


# ---- layout, measured over the DevTools protocol (the page itself has no script) ----------------------
@dataclass(frozen=True)
class Box:
    left: float
    top: float
    right: float
    bottom: float

    def inside(self, outer: Box, slack: float = 0.5) -> bool:
        return (self.left >= outer.left - slack and self.right <= outer.right + slack
                and self.top >= outer.top - slack and self.bottom <= outer.bottom + slack)


@dataclass(frozen=True)
class SvgLayout:
    label: str  # the svg's aria-label
    box: Box
    texts: list[tuple[str, Box]]  # each <text> element's content and border box


class _Cdp:
    """Sequential DevTools-protocol calls over one page's websocket; events are kept until asked for."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.last_id:
                assert "error" not in message, (method, message["error"])
                return dict(message["result"])
            self.events.append(message)

    async def event(self, method: str) -> dict[str, Any]:
        while True:
            for message in self.events:
                if message.get("method") == method:
                    self.events.remove(message)
                    return message
            self.events.append(await self.ws.receive_json())

    async def box(self, node_id: int) -> Box:
        quad = (await self.call("DOM.getBoxModel", nodeId=node_id))["model"]["border"]
        xs, ys = quad[0::2], quad[1::2]
        return Box(min(xs), min(ys), max(xs), max(ys))

    async def select(self, node_id: int, selector: str) -> list[int]:
        return list((await self.call("DOM.querySelectorAll", nodeId=node_id, selector=selector))["nodeIds"])


async def _devtools_address(stderr: asyncio.StreamReader) -> str:
    """host:port from Chromium's ``DevTools listening on ws://HOST:PORT/devtools/browser/...`` line."""
    while line := (await stderr.readline()).decode(errors="replace"):
        found = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if found:
            return found.group(1)
    raise AssertionError("Chromium exited without opening its DevTools endpoint")


async def _svg_layouts(page: Path, profile: Path) -> list[SvgLayout]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install the distribution's package (apt-get install -y chromium)")
    browser = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
        "--disable-background-networking", "--disable-component-update", "--remote-debugging-port=0",
        "--window-size=1280,900", f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert browser.stderr is not None
    try:
        async with asyncio.timeout(90):
            address = await _devtools_address(browser.stderr)
            drain = asyncio.create_task(browser.stderr.read())  # keep the pipe from filling up
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{address}/json/list") as answer:
                    targets = await answer.json()
                url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with http.ws_connect(url, max_msg_size=0) as ws:
                    layouts = await _measure(_Cdp(ws), page)
            drain.cancel()
            return layouts
    finally:
        browser.kill()
        await browser.wait()


async def _measure(cdp: _Cdp, page: Path) -> list[SvgLayout]:
    await cdp.call("Page.enable")
    await cdp.call("Page.navigate", url=page.as_uri())
    await cdp.event("Page.loadEventFired")
    root = (await cdp.call("DOM.getDocument", depth=0))["root"]["nodeId"]
    layouts = []
    for svg in await cdp.select(root, "svg"):
        label = (await cdp.call("DOM.getAttributes", nodeId=svg))["attributes"]
        texts = []
        for text in await cdp.select(svg, "text"):
            markup = (await cdp.call("DOM.getOuterHTML", nodeId=text))["outerHTML"]
            texts.append((re.sub(r"<[^>]*>", "", markup), await cdp.box(text)))
        layouts.append(SvgLayout(dict(zip(label[0::2], label[1::2], strict=True)).get("aria-label", ""),
                                 await cdp.box(svg), texts))
    return layouts


def test_chart_labels_lie_inside_their_svg(job: Job, tmp_path: Path) -> None:
    layouts = asyncio.run(_svg_layouts(job.html_path, tmp_path / "profile"))
    assert [svg.label for svg in layouts] == ["items finished per minute", "histogram of scale factors"]
    for svg in layouts:
        assert svg.texts and svg.box.right > svg.box.left + 100, svg
        outside = [(text, box) for text, box in svg.texts if not box.inside(svg.box)]
        assert outside == [], (svg.label, svg.box, outside)


def _edge_case_page(job: Job, directory: Path) -> Path:
    """A report whose charts end exactly on their right edge: the last time tick, the last histogram
    label and the median line (most items at the highest factor) all sit there."""
    settings = dataclasses.replace(job.settings, state_dir=directory)
    clock = [1796190000.0]  # a whole minute: the time ticks fall on the first and the last bin edge
    checkpoint = Checkpoint.open(settings.checkpoint_path, settings.name, now=lambda: clock[0])
    factors = [2.0] + [4.0] * 11  # 12 ten-second bins; scale factors 2x-4x in 21 bins of 0.1x
    with checkpoint.scan():
        for i in range(len(factors)):
            checkpoint.record_scanned(Scanned(key=f"k{i}", seq=i, source="photos", relpath=f"{i}.png", size=1,
                                              mtime_ns=1, params_hash="h", state=ItemState.PENDING,
                                              output_path=f"{i}.png", width=100, height=100))
    for i, factor in enumerate(factors):
        clock[0] = 1796190000.0 + 10 * i
        checkpoint.start(f"k{i}")
        checkpoint.count_attempt(f"k{i}")
        checkpoint.succeed(f"k{i}", 1, (int(100 * factor), int(100 * factor)))
    try:
        page = render_html(settings, checkpoint, job.header, sample_size=0)
    finally:
        checkpoint.close()
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def test_chart_labels_at_the_right_edge_are_not_clipped(job: Job, tmp_path: Path) -> None:
    page = _edge_case_page(job, tmp_path / "edge")
    html = page.read_text(encoding="utf-8")
    assert ">05:42:00</text>" in html and ">4.1×</text>" in html and "median 4×" in html
    layouts = asyncio.run(_svg_layouts(page, tmp_path / "profile"))
    assert len(layouts) == 2
    outside = [(svg.label, svg.box, text, box) for svg in layouts for text, box in svg.texts
               if not box.inside(svg.box)]
    assert outside == []

