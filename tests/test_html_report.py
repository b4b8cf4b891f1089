"""report.html: built from a real run on the embedded emulator, checked as text and in headless Chromium.

The job has succeeded images, a too-small one (skipped), a zero-byte .jpg (failed) and a failing
file whose name holds markup, quotes and a newline. Chromium comes from the distribution's
packages (``.ci/run`` installs it); without it the browser tests fail rather than skip.
"""

from __future__ import annotations

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

import pytest
import yaml
from PIL import Image

from batch_upscaler.checkpoint import Checkpoint
from batch_upscaler.cli import main
from batch_upscaler.htmlreport import render_html
from batch_upscaler.manifest import load_settings
from batch_upscaler.settings import JobSettings
from tests.conftest import manifest_doc, write_image

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
    report = json.loads((settings.report_dir / "report.json").read_text())
    header = {k: v for k, v in report.items() if k != "items"}
    html_path = settings.report_dir / "report.html"
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
        target = (job.settings.report_dir / urllib.parse.unquote(href)).resolve()
        assert target.is_file(), href
    resolved = {(job.settings.report_dir / urllib.parse.unquote(h)).resolve() for h in outputs}
    assert (job.settings.output_dir / "sub dir" / "pic é.png").resolve() in resolved


def test_sample_is_deterministic_and_bounded(job: Job) -> None:
    first = _render(job.settings, job.header, sample_size=3, thumb_px=64)
    assert first == _render(job.settings, job.header, sample_size=3, thumb_px=64)
    assert first.count('<figure class="pair">') == 3 and "width:64px;height:64px" in first
    names = re.findall(r'<span class="f" title="([^"]*)">', first)
    assert names == ["photos/img1.png", "photos/img3.png", "photos/sub dir/pic é.jpg"]  # evenly spaced


def test_missing_or_broken_outputs_get_placeholders(job: Job, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(job.settings.output_dir, copy)
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
    import batch_upscaler.htmlreport as htmlreport

    first = _render(job.settings, job.header)
    assert list((job.settings.state_dir / "thumbnails").glob("*.txt"))

    def no_decoding(path: Path, px: int) -> str | None:
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(htmlreport, "_thumbnail", no_decoding)
    assert _render(job.settings, job.header) == first
