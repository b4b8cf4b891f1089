"""Output naming templates: fields, escaping the output root, and collisions caught at scan time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from batch_upscaler.cli import main
from batch_upscaler.naming import NameParts, NamingError, render, template_problem
from tests.conftest import local_dir, write_image

PARTS = NameParts("2020/trip/IMG_01.JPG", "fast", 4.0)


@pytest.mark.parametrize(("template", "expected"), [
    ("{relpath}", "2020/trip/IMG_01.png"),
    ("{stem}", "IMG_01.png"),
    ("{model}/{relpath}-{scale}", "fast/2020/trip/IMG_01-4x.png"),
    ("{relpath}.{ext}", "2020/trip/IMG_01.JPG.png"),
])
def test_render(template: str, expected: str) -> None:
    assert render(template, PARTS, ".png") == expected


@pytest.mark.parametrize("template", ["../{stem}", "/abs/{stem}", "{stem}/../../x", ".hidden/{stem}"])
def test_paths_leaving_the_root_or_hidden_are_refused(template: str) -> None:
    with pytest.raises(NamingError):
        render(template, PARTS, ".png")


def test_template_problems() -> None:
    assert template_problem("{relpath}") is None
    assert template_problem("{nope}") == "unknown field(s) {nope}; use ext, model, relpath, scale, stem"
    assert template_problem("{stem!r}") == "fields take no format spec or conversion"
    assert template_problem("{stem") is not None


def test_collisions_are_reported_before_any_request(tmp_path: Path, write_manifest: Callable[..., Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "photos/a/x.png")
    write_image(tmp_path / "photos/b/x.png")
    manifest = write_manifest(output={"naming": "{stem}"})
    assert main(["run", str(manifest)]) == 1
    report = json.loads((tmp_path / ".batch-upscaler/reports/job/report.json").read_text())
    by_source = {i["source"]: i for i in report["items"]}
    assert by_source["photos/b/x.png"]["error_message"] == (
        "output_conflict: out/x.png already belongs to photos/a/x.png")
    assert report["requests"] == 1
    assert "output_conflict" in capsys.readouterr().err


def test_names_join_strings_exactly_as_paths_would(tmp_path: Path) -> None:
    """storage.names joins prefixes as strings for speed: the same names as the Path arithmetic."""
    import dataclasses

    from batch_upscaler.discovery import display_path
    from batch_upscaler.manifest import load_settings
    from batch_upscaler.storage.names import Names

    outside = tmp_path / "elsewhere"
    (tmp_path / "job" / "photos").mkdir(parents=True)
    outside.mkdir()
    manifest = tmp_path / "job" / "m.yaml"
    manifest.write_text(json.dumps({"version": 1, "name": "n", "sources": [".", "photos", str(outside),
                                                                          "photos/**/*.jpg"],
                                    "output": {"dir": "out"}, "model": {"name": "fast"}}))
    settings = load_settings(manifest)
    for output_dir in (settings.output_dir, outside / "o", Path("/")):
        names = Names(dataclasses.replace(settings, output_dir=output_dir))
        for source in settings.sources:
            for relpath in ("a.jpg", "2020/trip/IMG 1.JPG", "é/\\x ff.png"):
                assert names.item(source, relpath) == display_path(names.local, source, relpath, settings.base_dir)
                assert names.output_location(relpath) == str(local_dir(output_dir) / relpath)
