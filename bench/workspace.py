"""Where a benchmark run keeps its files: the output folder, cached corpora and fresh work folders."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "out"  # git-ignored


@dataclass(frozen=True)
class Workspace:
    """``out`` holds the JSON results; corpora are cached below it, work folders are made afresh."""

    out: Path = DEFAULT_OUT
    smoke: bool = False

    def corpus_dir(self, name: str) -> Path:
        """A cached corpus folder (kept between runs; the corpus module checks its recipe)."""
        return self.out / "corpora" / name

    def fresh(self, name: str) -> Path:
        """An empty work folder for one measurement (its previous contents are removed)."""
        path = self.out / "work" / (f"{name}-smoke" if self.smoke else name)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path
