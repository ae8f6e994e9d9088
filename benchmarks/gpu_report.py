"""The one table of a GPU check (benchmarks/gpu_check.sh): the JSON rows of train_throughput.py
(throughput, loader, end to end, memory) and the pytest summary, as markdown for RESULTS.md.

    python benchmarks/gpu_report.py OUT_DIR          # prints the table; writes OUT_DIR/summary.md
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

COLUMNS = [("row", "row"), ("variant", "variant"), ("pairs", "mixing"), ("res", "px"),
           ("batch", "batch"), ("img_s", "examples/s"), ("images_s", "images/s"),
           ("step_ms", "step ms"), ("agc", "AGC ms (share)"), ("mfu_pct", "MFU %"),
           ("peak_gib", "peak GiB"), ("compile_s", "compile s"), ("note", "note")]


def cells(row: dict) -> list[str]:
    r = dict(row)
    if "agc_ms" in r:
        r["agc"] = f"{r['agc_ms']:.2f} ({r['agc_pct']:.1f}%)"
    if "fits_h100" in r:
        r["note"] = (f"reserved {r['reserved_gib']} GiB; 80 GB H100: "
                     f"{'fits' if r['fits_h100'] else 'NO'}; 141 GB H200: "
                     f"{'fits' if r['fits_h200'] else 'NO'} (10% headroom)")
    if not r.get("compile_s"):
        r.pop("compile_s", None)
    return ["" if r.get(k) is None else str(r[k]) for k, _ in COLUMNS]


# the files of gpu_check.sh, and how their rows are labelled in the table
PARTS = [("throughput.json", ""), ("compile.json", "cold compile, GPU shared: "),
         ("memory.json", "")]


def load_rows(out: Path) -> tuple[dict, list[dict]]:
    env, rows = {}, []
    for name, label in PARTS:
        path = out / name
        if not path.is_file():
            rows.append({"row": name, "note": "missing: that part did not run or write"})
            continue
        data = json.loads(path.read_text())
        env = env or data.get("env", {})
        rows += [{**r, "row": label + r.get("row", "?")} for r in data.get("rows", [])]
    return env, rows


def pytest_summary(out: Path) -> str:
    """pytest's closing lines ('3 passed, 1 failed in 80.1s'), one per run in pytest.log."""
    path = out / "pytest.log"
    if not path.is_file():
        return "pytest -m gpu: no log"
    found = [ln.strip(" =") for ln in path.read_text(errors="replace").splitlines()
             if re.search(r"\b\d+ (passed|failed|error|errors|skipped|deselected)\b.* in [\d.]+s", ln)]
    return "pytest -m gpu: " + ("; ".join(found) if found else "no summary line (see pytest.log)")


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    return "\n".join([head, rule] + ["| " + " | ".join(cells(r)) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(".")
    env, rows = load_rows(out)
    text = "\n".join([json.dumps(env), pytest_summary(out), "", table(rows)])
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
