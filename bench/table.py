"""Benchmark results as data: rows and target checks, printed as plain-text tables and saved as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header and how a value is shown."""

    key: str
    header: str
    fmt: str = "{}"

    def show(self, row: Row) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


@dataclass(frozen=True)
class Check:
    """A target from the issue and whether this run met it."""

    figure: str
    measured: float
    target: str
    met: bool


@dataclass
class ScenarioResult:
    """What one scenario produced: its table rows and its target checks."""

    scenario: str
    smoke: bool
    columns: Sequence[Column]
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "smoke": self.smoke, "rows": self.rows,
                "checks": [asdict(check) for check in self.checks], "notes": self.notes,
                "columns": [column.key for column in self.columns], "machine": machine(),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def render(columns: Sequence[Column], rows: Sequence[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[column.header for column in columns]] + [[column.show(row) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)) + " |"
             for line in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


CHECK_COLUMNS = (Column("scenario", "scenario"), Column("figure", "figure"), Column("measured", "measured", "{:.3g}"),
                 Column("target", "target"), Column("met", "met"))


def render_checks(results: Sequence[ScenarioResult]) -> str:
    rows = [{"scenario": result.scenario + (" (smoke)" if result.smoke else ""), "figure": check.figure,
             "measured": check.measured, "target": check.target, "met": "yes" if check.met else "NO"}
            for result in results for check in result.checks]
    return render(CHECK_COLUMNS, rows)


def save(result: ScenarioResult, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.scenario}{'-smoke' if result.smoke else ''}.json"
    path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return path
