"""Ordinary archive life, with the real command and an emulator process whose request log is the bill.

Files added later, sources written another way, outputs edited by hand, a job pointed at its own
sources, limits changed: each must end with every paid result kept, nothing paid twice, and the
reason for anything refused recorded before any request (issue 9, points 1, 2, 3, 6 and 15).
"""

from __future__ import annotations

import io
import json
import subprocess
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, PngImagePlugin

from bench.emulator_process import EmulatorProcess
from tests.conftest import manifest_doc, run_cli

RED, BLUE = (220, 20, 20), (20, 20, 220)
EmulatorStarter = Callable[..., EmulatorProcess]


def solid(path: Path, colour: tuple[int, ...], size: tuple[int, int] = (96, 80), fmt: str = "PNG",
          mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    path.write_bytes(buffer.getvalue())
    return path


def colour_of(path: Path) -> tuple[int, ...]:
    with Image.open(path) as im:
        pixel = im.convert("RGB").getpixel((im.width // 2, im.height // 2))
    assert isinstance(pixel, tuple)
    return tuple(int(v) for v in pixel)


def near(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(abs(x - y) <= 12 for x, y in zip(a, b, strict=True))


def run(manifest: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", str(manifest), *flags)


def plan(manifest: Path) -> dict[str, Any]:
    result = run_cli("plan", str(manifest), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def items(tmp_path: Path, job: str = "job") -> dict[str, dict[str, Any]]:
    report = json.loads((tmp_path / f".batch-upscaler/reports/{job}/report.json").read_text())
    return {item["source"]: item for item in report["items"]}


def job_manifest(write_manifest: Callable[..., Path], emulator: EmulatorProcess, **overrides: Any) -> Path:
    return write_manifest(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url}, **overrides)


def test_a_file_added_later_never_takes_over_a_finished_files_output(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    solid(tmp_path / "photos/a.png", RED)
    manifest = job_manifest(write_manifest, emulator)
    assert run(manifest).returncode == 0
    paid = (tmp_path / "out/a.png").read_bytes()

    solid(tmp_path / "photos/a.jpg", BLUE, fmt="JPEG")  # its output would be out/a.png too
    planned = plan(manifest)
    assert planned["requests"] == 0 and planned["refused_by_reason"] == {"output_conflict": 1}
    second = run(manifest)
    assert second.returncode == 1, second.stderr  # a new failure in this run
    assert "output_conflict: out/a.png already belongs to photos/a.png" in second.stderr
    assert (tmp_path / "out/a.png").read_bytes() == paid and len(emulator.records()) == 1
    by_source = items(tmp_path)
    assert by_source["photos/a.png"]["status"] == "succeeded"
    assert (by_source["photos/a.jpg"]["status"], by_source["photos/a.jpg"]["error_code"]) == \
        ("failed", "output_conflict")

    third = run(manifest)  # the same, already-reported conflict: not news
    assert third.returncode == 0, third.stderr
    assert "1 item(s) failed in earlier runs" in third.stderr
    assert (tmp_path / "out/a.png").read_bytes() == paid and len(emulator.records()) == 1

    (tmp_path / "photos/a.png").unlink()  # the holder is gone: the newcomer may take the path
    assert run(manifest).returncode == 0
    assert near(colour_of(tmp_path / "out/a.png"), BLUE) and len(emulator.records()) == 2


def test_output_names_are_compared_the_way_the_output_volume_compares_them(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    solid(tmp_path / "photos/Beach.png", RED)
    solid(tmp_path / "photos/beach.png", BLUE)  # same name on a case-insensitive volume
    solid(tmp_path / "photos" / unicodedata.normalize("NFC", "café.png"), (20, 200, 20))
    solid(tmp_path / "photos" / unicodedata.normalize("NFD", "café.png"), (200, 200, 20))  # same once normalised
    manifest = job_manifest(write_manifest, emulator)
    assert run(manifest).returncode == 1
    states = sorted(item["status"] for item in items(tmp_path).values())
    assert states == ["failed", "failed", "succeeded", "succeeded"] and len(emulator.records()) == 2

    # A case-sensitive, non-normalising volume: the same four names are four outputs.
    manifest = job_manifest(write_manifest, emulator, output={"dir": "out", "name_compare": "exact"})
    assert run(manifest).returncode == 0
    assert {item["status"] for item in items(tmp_path).values()} == {"succeeded"}
    assert len(emulator.records()) == 4


def test_a_job_that_would_write_over_its_own_sources_is_refused_before_paying(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    originals = {name: solid(tmp_path / "photos" / name, RED).read_bytes() for name in ("a.png", "b.png")}
    cases = {
        "files.yaml": {"sources": ["photos/a.png", "photos/b.png"], "output": {"dir": "photos"}},
        "template.yaml": {"sources": ["photos"], "output": {"dir": ".", "naming": "photos/{relpath}"}},
        "again.yaml": {"sources": ["photos"], "output": {"dir": ".", "naming": "photos/{stem}-4x"}},
        "folder.yaml": {"sources": ["photos"], "output": {"dir": "photos"}},
    }
    for name, overrides in cases.items():
        doc = manifest_doc(backend="bedrock", bedrock={"endpoint_url": emulator.endpoint_url}, **overrides)
        manifest = write_manifest(doc | {"name": name[:-5]}, name=name)
        result = run(manifest)
        assert result.returncode == 2, (name, result.stderr)
        assert "outside the sources" in result.stderr, (name, result.stderr)
        assert run_cli("plan", str(manifest)).returncode == 2
    assert len(emulator.records()) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()} == originals  # nothing written


def test_dedup_copies_only_an_output_proven_to_be_what_was_recorded(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    solid(tmp_path / "photos/a.png", RED)
    assert run(job_manifest(write_manifest, emulator)).returncode == 0
    absolute = job_manifest(write_manifest, emulator, sources=[str(tmp_path / "photos")])  # new keys, same files
    assert run(absolute).returncode == 0
    assert len(emulator.records()) == 1  # the old key's output is still exactly what was recorded: copied
    solid(tmp_path / "photos/a.png", BLUE)
    assert run(absolute).returncode == 0 and len(emulator.records()) == 2
    assert near(colour_of(tmp_path / "out/a.png"), BLUE)

    solid(tmp_path / "photos/a-original.png", RED)  # the red picture is back, under another name
    assert run(absolute).returncode == 0
    assert len(emulator.records()) == 3  # the gone row's output is blue now: not proven, so sent
    assert near(colour_of(tmp_path / "out/a-original.png"), RED)
    assert all(item["dedup_of"] is None for item in items(tmp_path).values())


def test_dedup_after_a_setting_is_changed_and_reverted_sends_again(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    solid(tmp_path / "photos/a.png", (200, 10, 10, 0), mode="RGBA")  # transparent: the background shows
    assert run(job_manifest(write_manifest, emulator)).returncode == 0
    first = (tmp_path / "out/a.png").read_bytes()
    sources = [str(tmp_path / "photos")]
    assert run(job_manifest(write_manifest, emulator, sources=sources)).returncode == 0
    black = job_manifest(write_manifest, emulator, sources=sources, prepare={"background": "#000000"})
    assert run(black).returncode == 0 and len(emulator.records()) == 2
    assert near(colour_of(tmp_path / "out/a.png"), (0, 0, 0))
    assert run(job_manifest(write_manifest, emulator, sources=sources)).returncode == 0  # reverted
    assert len(emulator.records()) == 3  # the white-background result recorded earlier was overwritten
    assert (tmp_path / "out/a.png").read_bytes() == first


def test_an_edited_output_is_left_alone_unless_verification_is_asked_for(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    solid(tmp_path / "photos/a.png", RED)
    manifest = job_manifest(write_manifest, emulator)
    assert run(manifest).returncode == 0
    output = tmp_path / "out/a.png"
    with Image.open(output) as im:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "retouched by hand")
        im.save(output, pnginfo=info)
    edited = output.read_bytes()
    assert run(manifest).returncode == 0 and output.read_bytes() == edited
    with Image.open(output) as im:
        im.save(output, optimize=True)
    edited = output.read_bytes()
    assert run(manifest).returncode == 0 and output.read_bytes() == edited
    assert len(emulator.records()) == 1  # edits are not damage: nothing was paid again

    assert run(manifest, "--verify-outputs").returncode == 0
    assert len(emulator.records()) == 2 and output.read_bytes() != edited
    output.unlink()
    assert run(manifest).returncode == 0 and output.exists() and len(emulator.records()) == 3


def test_skips_are_decided_again_when_the_limits_they_quote_change(
        tmp_path: Path, write_manifest: Callable[..., Path], emulator_process: EmulatorStarter) -> None:
    emulator = emulator_process()
    solid(tmp_path / "photos/big.png", RED, size=(2600, 2000))  # 5.2 MP
    config = tmp_path / "lowered.yaml"
    config.write_text(yaml.safe_dump({"models": {"conservative": {"max_pixels": 5_000_000}}}))
    manifest = job_manifest(write_manifest, emulator, prepare={"oversize": "skip"})
    assert run(manifest, "--config", str(config)).returncode == 0
    big = items(tmp_path)["photos/big.png"]
    assert (big["status"], big["error_code"]) == ("skipped", "too_many_pixels")
    assert run(manifest, "--config", str(config)).returncode == 0 and len(emulator.records()) == 0

    assert plan(manifest)["requests"] == 1  # the built-in limit (9.4 MP) admits it
    assert run(manifest).returncode == 0
    assert items(tmp_path)["photos/big.png"]["status"] == "succeeded" and len(emulator.records()) == 1
