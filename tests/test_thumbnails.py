"""The report's thumbnail sample is stable as a job grows, and pictures are made once."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from batch_upscaler import thumbnails
from batch_upscaler.thumbnails import KEEP_FACTOR, StableSample, ThumbnailCache, sample_rank, worth_keeping


def _rows(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"key": f"photos:album/{n:06d}.jpg", "seq": n} for n in range(start, start + count)]


def _sample(rows: list[dict[str, Any]], size: int = 24) -> list[str]:
    sample = StableSample(size)
    for row in rows:
        sample.offer(row)
    return [row["key"] for row in sample.rows()]


def test_rank_is_stable_and_spreads() -> None:
    assert sample_rank("photos:a.jpg") == sample_rank("photos:a.jpg") != sample_rank("photos:b.jpg")
    assert sample_rank("photos:caf\udce9.jpg") >= 0  # a key of a non-UTF-8 name ranks too
    ranks = [sample_rank(row["key"]) for row in _rows(4000)]
    assert 0.45 < sum(r < 1 << 63 for r in ranks) / len(ranks) < 0.55


def test_sample_is_the_smallest_ranks_in_discovery_order() -> None:
    rows = _rows(500)
    picked = _sample(rows, 7)
    lowest = sorted(rows, key=lambda row: sample_rank(row["key"]))[:7]
    assert picked == [row["key"] for row in sorted(lowest, key=lambda row: row["seq"])]
    assert _sample(list(reversed(rows)), 7) == picked  # offered in any order: the same sample
    assert _sample(rows[:3], 7) == [row["key"] for row in rows[:3]] and _sample(rows, 0) == []


def test_adding_a_few_items_keeps_the_sample() -> None:
    """The point of the stable sample: a top-up run changes it only where a new item ranks lower."""
    before = _sample(_rows(10_000))
    added = _rows(5, start=10_000)
    after = _sample(_rows(10_000) + added)
    entered = set(after) - set(before)
    assert entered <= {row["key"] for row in added}
    assert len(set(before) & set(after)) == len(before) - len(entered)
    changed = sum(_sample(_rows(10_000) + _rows(5, start=10_000 + 5 * t)) != before for t in range(40))
    assert changed <= 4  # ~1.2% of top-ups change it; 40 trials would see ~0.5


def test_worth_keeping_covers_the_sample_of_a_partly_done_job() -> None:
    rows = _rows(20_000)
    kept = [row for row in rows if worth_keeping(row["key"], len(rows))]
    assert abs(len(kept) - KEEP_FACTOR * 24) < 60
    done = rows[::4]  # a quarter succeeded so far: its sample still comes from kept items
    assert set(_sample(done)) <= {row["key"] for row in kept}
    assert all(worth_keeping(row["key"], 50) for row in rows[:50])  # a small job keeps everything


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def test_file_pictures_are_made_once_per_version(tmp_path: Path, monkeypatch: Any) -> None:
    image = tmp_path / "out.png"
    image.write_bytes(_png((640, 320)))
    cache = ThumbnailCache(tmp_path / "thumbs", 64)
    made: list[object] = []
    real = thumbnails.make_thumbnail

    def counted(src: Any, px: int) -> str | None:
        made.append(src)
        return real(src, px)

    monkeypatch.setattr(thumbnails, "make_thumbnail", counted)
    first = cache.of_file(image)
    assert first and first.startswith("data:image/jpeg;base64,") and cache.of_file(image) == first
    assert len(made) == 1
    image.write_bytes(_png((320, 640)))  # a new version (size changes): a new picture
    assert cache.of_file(image) != first and len(made) == 2
    assert cache.of_file(tmp_path / "missing.png") is None


def test_item_pictures_come_from_bytes_at_hand(tmp_path: Path) -> None:
    cache = ThumbnailCache(tmp_path / "thumbs", 64)
    assert cache.of_item("s3:k.png", "after", "d1") is None
    cache.keep("s3:k.png", "after", "d1", _png((300, 200)))
    uri = cache.of_item("s3:k.png", "after", "d1")
    assert uri and uri.startswith("data:image/jpeg;base64,")
    assert cache.of_item("s3:k.png", "after", "d2") is None and cache.of_item("s3:k.png", "before", "d1") is None
    cache.keep("s3:bad.png", "after", "d1", b"not an image")  # no picture, no exception
    assert cache.of_item("s3:bad.png", "after", "d1") is None

