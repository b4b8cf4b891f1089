"""Hostile file names in items.csv and report.md: no spreadsheet formula, no live Markdown.

The names are real files of a real run (zero-byte ones fail with ``empty_file`` and so are listed
in report.md); items.csv is read back with csv.reader, and report.md is rendered by a CommonMark
parser (markdown-it-py), as a viewer would.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token

from batch_upscaler.cli import main
from batch_upscaler.report import CSV_COLUMNS, Summary, render_markdown
from tests.conftest import manifest_doc, write_image

FORMULA_NAMES = ('=HYPERLINK("http:x","y").png', "+SUM(1).png", "@cmd.png", "-2+3.png",
                 "\tleading-tab.png", "\rleading-cr.png")
MARKDOWN_NAMES = ("x`[click](http:evil.example)`.png", "`starts-with-backtick.png", "`both`.png", " leading space.png",
                  "a``b```c.png", "[link](http:evil.example).png", "<http:evil.example>.png",
                  "![img](data:x).png", "*em* _em_ &amp; <b onmouseover=x>bold.png")
NUMERIC_NAME = "-1.png"  # succeeds: its name is text, its sizes and counts stay numbers


def _run(tmp_path: Path) -> Path:
    for name in (*FORMULA_NAMES, *MARKDOWN_NAMES):
        (tmp_path / name).write_bytes(b"")  # failed: empty_file
    write_image(tmp_path / NUMERIC_NAME, 96, 80)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(manifest_doc(sources=["."])))  # names are relative to the manifest
    assert main(["run", str(manifest)]) == 1
    return tmp_path / ".batch-upscaler" / "reports" / "job"


def test_csv_cells_cannot_start_a_formula(tmp_path: Path) -> None:
    reports = _run(tmp_path)
    with (reports / "items.csv").open(encoding="utf-8", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert tuple(header) == CSV_COLUMNS
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    for name in FORMULA_NAMES:
        assert f"'{name}" in cells, (name, sorted(cells))
    assert "'" + NUMERIC_NAME in cells
    for row in rows:
        for cell in row:
            assert not cell or cell[0] not in "=+-@\t\r", row
    ok = cells["'" + NUMERIC_NAME]
    assert ok["status"] == "succeeded"
    assert (ok["input_width"], ok["input_height"], ok["attempts"], ok["throttles"]) == ("96", "80", "1", "0")
    assert float(ok["scale_factor"]) > 1 and not ok["scale_factor"].startswith("'")


def _inline_tokens(tokens: list[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        if token.children:
            yield from _inline_tokens(token.children)


def _assert_inert(markdown: str) -> list[Token]:
    tokens = list(_inline_tokens(MarkdownIt("commonmark").parse(markdown)))
    live = [t for t in tokens if t.type in ("link_open", "image", "html_inline", "html_block")
            or t.tag in ("em", "a", "img")]  # the template's own **model** is strong
    assert live == [], live
    return tokens


def test_report_md_shows_names_as_code(tmp_path: Path) -> None:
    reports = _run(tmp_path)
    tokens = _assert_inert((reports / "report.md").read_text(encoding="utf-8"))
    code = [t.content for t in tokens if t.type == "code_inline"]
    for name in MARKDOWN_NAMES:
        assert name in code, (name, code)
    for name in FORMULA_NAMES:  # control characters are shown escaped, as in logs
        assert name.replace("\t", "\\t").replace("\r", "\\r") in code, (name, code)


def test_report_md_escapes_reasons_and_messages() -> None:
    reason = "[x](http:evil.example) *bold* <i>"
    header = {"job": "job_[a](b)", "model": "conservative", "model_id": "us.m`v1", "backend": "emulator",
              "started_at": None, "finished_at": None, "requests": 0, "throttled_attempts": 0,
              "requests_saved_by_dedup": 0, "estimated_cost_usd": 0.0,
              "totals": dict.fromkeys(("discovered", "succeeded", "failed", "skipped", "pending", "in_progress"), 0),
              "scale_factor": {"min": None, "median": None, "max": None, "mean": None}}
    summary = Summary()
    summary.failures[reason].append(("a.png", "see [here](http:evil.example) & <b>x</b> `y`"))
    summary.reason_counts[f"failed:{reason}"] = 1
    markdown = render_markdown(header, summary)
    tokens = _assert_inert(markdown)
    text = "".join(t.content for t in tokens if t.type in ("text", "code_inline") and not t.children)
    assert reason in text and "see [here](http:evil.example) & <b>x</b> `y`" in text
    assert "job_[a](b)" in text and "us.m`v1" in text
