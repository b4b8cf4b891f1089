"""Discovery: sources, globs, excludes, hidden files, links, overlap and order."""

from __future__ import annotations

import os
from pathlib import Path

from batch_upscaler.discovery import Discovery, EntryKind, parse_source
from tests.conftest import write_image


def keys(base: Path, sources: list[str], exclude: tuple[str, ...] = (), prune: tuple[Path, ...] = ()) -> list[str]:
    roots = [parse_source(s, base) for s in sources]
    return [f.key for f in Discovery(roots, exclude, prune=prune, base_dir=base)]


def test_directories_recursive_case_insensitive_sorted_and_hidden_skipped(tmp_path: Path) -> None:
    for rel in ("p/b.JPG", "p/a.png", "p/sub/c.webp", "p/sub/d.TIFF", "p/.hidden.jpg", "p/._a.png",
                "p/.cache/e.jpg", "p/notes.txt", "p/sub/f.jpeg"):
        path = tmp_path / rel
        if rel.endswith(".txt"):
            path.write_text("x")
        else:
            write_image(path)
    assert keys(tmp_path, ["p"]) == ["p:a.png", "p:b.JPG", "p:sub/c.webp", "p:sub/d.TIFF", "p:sub/f.jpeg"]


def test_glob_source_is_relative_to_its_static_prefix(tmp_path: Path) -> None:
    for rel in ("phone/2020/a.jpg", "phone/2021/x/b.JPG", "phone/c.png", "phone/d.jpg"):
        write_image(tmp_path / rel)
    assert keys(tmp_path, ["phone/**/*.jpg"]) == ["phone/**/*.jpg:d.jpg", "phone/**/*.jpg:2020/a.jpg",
                                                  "phone/**/*.jpg:2021/x/b.JPG"]
    roots = [parse_source("phone/**/*.jpg", tmp_path)]
    assert roots[0].root == tmp_path / "phone" and roots[0].pattern == "**/*.jpg"


def test_excludes_match_below_root_or_manifest_dir(tmp_path: Path) -> None:
    for rel in ("p/a.jpg", "p/thumbnails/a.jpg", "p/x/thumbnails/b.jpg", "p/old/c.jpg"):
        write_image(tmp_path / rel)
    assert keys(tmp_path, ["p"], ("**/thumbnails/**", "p/old/*")) == ["p:a.jpg"]


def test_overlapping_sources_and_links_yield_each_file_once(tmp_path: Path) -> None:
    write_image(tmp_path / "p/a.jpg")
    write_image(tmp_path / "p/sub/b.jpg")
    os.link(tmp_path / "p/a.jpg", tmp_path / "p/hardlink.jpg")
    os.symlink(tmp_path / "p/sub/b.jpg", tmp_path / "p/symlink.jpg")
    # Files come before subdirectories, so the link is met first and wins; the target is not repeated.
    assert keys(tmp_path, ["p", "p/sub", "p/**/*.jpg"]) == ["p:a.jpg", "p:symlink.jpg"]


def test_symlink_loops_are_survived_and_outside_links_followed(tmp_path: Path) -> None:
    write_image(tmp_path / "p/a.jpg")
    write_image(tmp_path / "elsewhere/e.jpg")
    os.symlink(tmp_path / "p", tmp_path / "p/loop")
    os.symlink(tmp_path / "elsewhere", tmp_path / "p/ext")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "p/dangling.jpg")
    errors: list[tuple[str, str]] = []
    found = list(Discovery([parse_source("p", tmp_path)], on_error=lambda p, m: errors.append((p, m))))
    assert [f.key for f in found] == ["p:a.jpg", "p:ext/e.jpg"]
    assert [Path(p).name for p, _ in errors] == ["dangling.jpg"]


def test_pruned_directories_are_never_entered(tmp_path: Path) -> None:
    write_image(tmp_path / "p/a.jpg")
    write_image(tmp_path / "p/out/a.png")
    assert keys(tmp_path, ["p"], prune=(tmp_path / "p/out",)) == ["p:a.jpg"]


def test_single_file_source_and_fifo_named_like_an_image(tmp_path: Path) -> None:
    write_image(tmp_path / "one.png")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d/pipe.jpg")
    found = list(Discovery([parse_source("one.png", tmp_path), parse_source("d", tmp_path)]))
    assert [(f.key, f.kind) for f in found] == [("one.png:one.png", EntryKind.FILE),
                                                ("d:pipe.jpg", EntryKind.NOT_REGULAR)]


def test_discovery_is_a_lazy_stream(tmp_path: Path) -> None:
    for i in range(5):
        write_image(tmp_path / f"p/{i}.png")
    stream = iter(Discovery([parse_source("p", tmp_path)]))
    assert next(stream).relpath == "0.png"  # nothing forces the whole walk up front
