"""LocalOutputStore: an output appears whole, from its parts, or not at all; staging is per run;
paths that cannot be written are known before paying; one job per output root."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_upscaler.errors import OutputUnavailable, UsageError
from batch_upscaler.storage.base import OutputPathError
from batch_upscaler.storage.local import STAGING_DIR, LocalOutputStore, digest_parts, new_file_mode


def staged_files(root: Path) -> list[Path]:
    return [p for p in (root / STAGING_DIR).rglob("*") if p.is_file() and p.name != ".lock"]


def test_parts_are_written_in_order_with_size_mode_and_mtime(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: above any write buffer, so it goes straight to write(2)
    parts = (b"head", memoryview(payload)[10:], b"", b"tail")
    store = LocalOutputStore(tmp_path)

    written = store.write_atomic("a/b/out.png", parts, mtime_ns=1_600_000_000_123_456_789)

    target = tmp_path / "a" / "b" / "out.png"
    assert target.read_bytes() == b"head" + payload[10:] + b"tail"
    assert written.size == target.stat().st_size == 8 + len(payload) - 10
    assert written.digest == digest_parts((target.read_bytes(),))
    assert store.verify_file("a/b/out.png", written.size, written.digest)
    assert target.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert target.stat().st_mode & 0o777 == new_file_mode()
    assert staged_files(tmp_path) == []
    store.close_staging()
    assert not (tmp_path / STAGING_DIR).exists()


def test_a_write_that_fails_midway_leaves_neither_output_nor_temp_file(tmp_path: Path) -> None:
    store = LocalOutputStore(tmp_path)
    store.write_atomic("out.png", (b"old",))

    with pytest.raises(TypeError):
        store.write_atomic("out.png", (b"x" * 100_000, "not a buffer"))  # type: ignore[arg-type]

    assert (tmp_path / "out.png").read_bytes() == b"old"
    assert staged_files(tmp_path) == []
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


def test_an_edited_output_is_not_verified_but_still_exists(tmp_path: Path) -> None:
    store = LocalOutputStore(tmp_path)
    written = store.write_atomic("a.png", (b"paid result",))
    (tmp_path / "a.png").write_bytes(b"paid result, edited")
    assert store.exists("a.png") and not store.verify_file("a.png", written.size, written.digest)
    assert store.read_verified_file("a.png", None, written.digest) is None
    assert store.read_verified_file("a.png", None, None) is None  # nothing recorded: not provable


def test_staging_is_per_run_and_a_live_runs_files_are_never_removed(tmp_path: Path) -> None:
    """Two jobs sharing a root: one's start must not delete the other's half-written files."""
    live = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from batch_upscaler.storage.local import LocalOutputStore\n"
        f"s = LocalOutputStore(Path({str(tmp_path)!r}))\n"
        "(s.staging() / 'half.part').write_bytes(b'x')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "ready"
        dead = tmp_path / STAGING_DIR / "999999-deadbeef"
        dead.mkdir()
        (dead / ".lock").write_text("")
        (dead / "left.part").write_bytes(b"y")  # a run that died: nobody holds its lock

        assert LocalOutputStore(tmp_path).clean_stale() == 1
        assert not dead.exists()
        assert [p.name for p in staged_files(tmp_path)] == ["half.part"]  # the live run's file stays
    finally:
        live.communicate("")
    assert LocalOutputStore(tmp_path).clean_stale() == 1  # its owner ended without cleaning up
    assert not (tmp_path / STAGING_DIR).exists()


def test_paths_that_cannot_be_written_are_refused_before_paying(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (root / "file").write_text("a file where a directory must go")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "escape")
    os.symlink(root / "sub", root / "inside")
    store = LocalOutputStore(root)
    store.check_path("sub/a.png")
    store.check_path("new/deeper/a.png")
    store.check_path("inside/a.png")  # a link that stays inside the root is fine
    with pytest.raises(OutputPathError, match="link leading outside the output root"):
        store.check_path("escape/a.png")
    with pytest.raises(OutputPathError, match="is a file where a directory must go"):
        store.check_path("file/a.png")
    with pytest.raises(OutputPathError, match="over this filesystem's limit of 255"):
        store.check_path("x" * 252 + "é.png")  # 257 bytes in UTF-8
    (root / "dir.png").mkdir()
    with pytest.raises(OutputPathError, match="a directory is in the way"):
        store.check_path("dir.png")


def test_a_second_job_is_refused_an_output_root_unless_both_share(tmp_path: Path) -> None:
    store = LocalOutputStore(tmp_path / "out")
    store.claim_root("nightly", shared=False)
    store.claim_root("nightly", shared=False)  # the same job again: fine
    with pytest.raises(UsageError, match="belongs to job 'nightly'"):
        store.claim_root("catalogue", shared=False)
    with pytest.raises(UsageError, match="belongs to job 'nightly'"):
        store.check_root_claim("catalogue", shared=True)  # 'nightly' did not opt in to sharing
    store.claim_root("nightly", shared=True)
    store.claim_root("catalogue", shared=True)
    store.check_root_claim("catalogue", shared=True)


def test_probe_writable_tells_full_from_forbidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalOutputStore(tmp_path / "out")
    store.probe_root()
    assert list((tmp_path / "out").iterdir()) == []  # the probe file is gone again

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputUnavailable, match="No space left on device"):
        store.probe_root()

    def forbidden(fd: int, data: bytes) -> int:
        raise OSError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "write", forbidden)
    with pytest.raises(UsageError, match="Permission denied"):
        store.probe_root()
