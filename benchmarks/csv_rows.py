"""Benchmark rows to a CSV file (the figures behind each table, for re-plotting and pairing)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (dicts sharing the first row's keys) to ``path`` with a header; folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
