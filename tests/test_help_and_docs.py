"""What users read: --help texts, YAML syntax errors with a caret that points, docs that stay in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batch_upscaler.cli import build_parser, main
from tests.conftest import REPO, run_cli

JOB_COMMANDS = ("run", "plan", "report", "status")


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "plan"])
def test_max_images_is_the_documented_spelling(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, command)
    assert "--max-images N" in text and "--limit" not in text and "LIMIT" not in text
    for flag in ("--max-images", "--limit"):  # the old spelling still works
        assert build_parser().parse_args([command, "job.yaml", flag, "3"]).limit == 3


@pytest.mark.parametrize("command", [*JOB_COMMANDS, "doctor"])
def test_manifest_and_verbose_are_explained(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, command)
    assert re.search(r"^  manifest +\S", text, re.MULTILINE), text
    assert re.search(r"^  -v, --verbose +\S", text, re.MULTILINE), text


def test_emulator_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "emulator")
    words = " ".join(text.split())  # argparse re-wraps the description
    assert "--quota-rpm" in words and "'emulator listening on http://127.0.0.1:PORT'" in words
    assert "``" not in text


def test_yaml_syntax_error_caret_points_at_the_column(tmp_path: Path) -> None:
    bad_line = "model: {name: conservative, prompt: a sharp photo]"
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(f"version: 1\nname: job\nsources: [photos]\n{bad_line}\n")
    column = bad_line.index("]")  # 0-based: PyYAML reports it 1-based
    result = run_cli("run", str(manifest))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert f'"{manifest}", line 4, column {column + 1}:' in result.stderr, result.stderr
    carets = [i for i, line in enumerate(lines) if line.strip() == "^"]
    assert len(carets) == 2, result.stderr  # the flow mapping's start, and the offending character
    pointed = [lines[i - 1][lines[i].index("^")] for i in carets]
    assert pointed == ["{", "]"], result.stderr


def test_docs_do_not_point_outside_the_repository() -> None:
    files = [REPO / "README.md", *(REPO / "docs").rglob("*"), *(REPO / "batch_upscaler").rglob("*"),
             *(REPO / "config").rglob("*")]
    offending = [str(path.relative_to(REPO)) for path in files
                 if path.is_file() and path.suffix in (".md", ".py", ".yaml", ".txt")
                 and "shared/reference" in path.read_text(encoding="utf-8")]
    assert offending == []
    assert (REPO / "docs" / "bedrock-reference.md").is_file()
