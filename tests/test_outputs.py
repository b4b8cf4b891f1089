"""LocalOutputStore: an output appears whole, from its parts, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batch_upscaler.outputs import STAGING_DIR, LocalOutputStore, new_file_mode


def test_parts_are_written_in_order_with_size_mode_and_mtime(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: above any write buffer, so it goes straight to write(2)
    parts = (b"head", memoryview(payload)[10:], b"", b"tail")
    store = LocalOutputStore(tmp_path)

    written = store.write_atomic("a/b/out.png", parts, mtime_ns=1_600_000_000_123_456_789)

    target = tmp_path / "a" / "b" / "out.png"
    assert target.read_bytes() == b"head" + payload[10:] + b"tail"
    assert written == target.stat().st_size == 8 + len(payload) - 10
    assert target.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert target.stat().st_mode & 0o777 == new_file_mode()
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


def test_a_write_that_fails_midway_leaves_neither_output_nor_temp_file(tmp_path: Path) -> None:
    store = LocalOutputStore(tmp_path)
    store.write_atomic("out.png", (b"old",))

    with pytest.raises(TypeError):
        store.write_atomic("out.png", (b"x" * 100_000, "not a buffer"))  # type: ignore[arg-type]

    assert (tmp_path / "out.png").read_bytes() == b"old"
    assert list((tmp_path / STAGING_DIR).iterdir()) == []
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]
