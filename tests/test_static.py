"""Package, tests and benchmarks stay ruff- and mypy-clean (checked in the default test run, so CI enforces it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "ruff", "check", "."],
    [sys.executable, "-m", "mypy", "batch_upscaler", "tests", "bench"],
])
def test_static_checks(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
