"""Ablation tables: the CSV and JSON every ablation report writes, in one format."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.files import atomic_write_text


def csv_text(rows: list[dict], fields: list[str]) -> str:
    """`rows` as CSV with the columns `fields` (others ignored): None empty, floats to 6
    significant digits, so the committed tables diff cleanly."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else
                        (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])) for k in fields})
    return buf.getvalue()


def write_table(rows: list[dict], fields: list[str], folder: Path, stem: str) -> None:
    """<folder>/<stem>.csv (the columns `fields`) and <stem>.json (every key), each atomic."""
    atomic_write_text(folder / f"{stem}.csv", csv_text(rows, fields))
    atomic_write_text(folder / f"{stem}.json", json.dumps(rows, indent=1, default=str) + "\n")
