"""The AGC sweep (paper Sec. 4.1, Figs. 2, 7): clip factor x global batch, a pretrain run a cell.

Each cell is a real pretrain run (`pipeline.ablation.runs`) with `pretrain.clip_factor` and
`pretrain.global_batch` set; the lr scales with the batch as the recipe says. `collect_agc` reads
the runs' resolved recipes and metrics and flags divergence: a non-finite loss or validation NLL,
skipped (non-finite) steps, or top-1 at chance. `write_agc` writes the table (CSV/JSON), a wide
CSV for `dvc plots` and one PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ablation.runs import divergence, read_run
from pipeline.ablation.table import csv_text, write_table
from pipeline.files import atomic_write_text

AGC_FIELDS = ["clip", "clip_factor", "global_batch", "lr", "steps", "val_top1", "val_top1_raw",
              "val_nll", "train_loss", "skipped_steps", "status", "train_time_s", "run"]


def parse_clip(text: str) -> float | None:
    """'0.04' -> 0.04; 'null' / 'off' / 'none' -> None (no clipping)."""
    return None if text.strip().lower() in ("null", "off", "none") else float(text)


def clip_label(clip: float | None) -> str:
    """How a clip factor reads in tables and plots: '0.04', or 'off' for no clipping."""
    return "off" if clip is None else f"{clip:g}"


def cell_dir(root: str | Path, clip: float | None, batch: int) -> Path:
    """The run folder of one cell, e.g. <root>/b64-clip0.01 or <root>/b64-clipnull."""
    return Path(root) / f"b{batch}-clip{'null' if clip is None else f'{clip:g}'}"


def cell_overrides(clip: float | None, batch: int, extra: list[str]) -> list[str]:
    """The dotted recipe overrides of one cell, then `extra` (those every cell shares)."""
    return [f"pretrain.clip_factor={'null' if clip is None else f'{clip:g}'}",
            f"pretrain.global_batch={batch}", *extra]


def collect_agc(runs: list[str | Path]) -> list[dict[str, Any]]:
    """One row per sweep cell (a pretrain run folder), sorted by clip factor (off last), batch."""
    rows = []
    for run in runs:
        r = read_run(run)
        m, s = r["metrics"] or {}, r["section"]
        rows.append({
            "clip": clip_label(s["clip_factor"]), "clip_factor": s["clip_factor"],
            "global_batch": s["global_batch"],
            "lr": r["derived"].get("lr"), "steps": m.get("steps", r["derived"].get("total_steps")),
            "val_top1": m.get("val_top1_ema", m.get("val_top1_raw")),
            "val_top1_raw": m.get("val_top1_raw"),
            "val_nll": m.get("val_nll_ema", m.get("val_nll_raw")),
            "train_loss": m.get("train_loss"), "skipped_steps": m.get("skipped_steps"),
            "status": divergence(r["metrics"], r["num_classes"]),
            "train_time_s": m.get("train_time_s"), "run": r["run"],
            "num_classes": r["num_classes"]})
    rows.sort(key=lambda x: (x["clip_factor"] is None, x["clip_factor"] or 0, x["global_batch"]))
    return rows


def write_agc(rows: list[dict], out: str | Path, title: str = "") -> dict[str, Path]:
    """agc_sweep.csv / .json (the table), agc_sweep_dvc.csv (global_batch x one column of top-1
    per clip factor, for `dvc plots`) and agc_sweep.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, AGC_FIELDS, out, "agc_sweep")
    clips = list(dict.fromkeys(clip_label(r["clip_factor"]) for r in rows))
    wide = []
    for b in sorted({r["global_batch"] for r in rows}):
        line = {"global_batch": b}
        for r in rows:
            if r["global_batch"] == b:
                line[f"clip_{clip_label(r['clip_factor'])}"] = r["val_top1"]
        wide.append(line)
    atomic_write_text(out / "agc_sweep_dvc.csv",
                      csv_text(wide, ["global_batch"] + [f"clip_{c}" for c in clips]))
    plot_agc(rows, out / "agc_sweep.png", title)
    return {k: out / f"agc_sweep{s}" for k, s in
            (("csv", ".csv"), ("json", ".json"), ("dvc", "_dvc.csv"), ("png", ".png"))}


def plot_agc(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Left: val top-1 against global batch, one line per clip factor; diverged cells drawn as
    crosses at their (chance-level) accuracy. Right: the grid of cells, coloured by top-1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = list(dict.fromkeys(clip_label(r["clip_factor"]) for r in rows))
    batches = sorted({r["global_batch"] for r in rows})
    by = {(clip_label(r["clip_factor"]), r["global_batch"]): r for r in rows}
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    _accuracy_lines(ax, rows, clips, batches, by, plt.get_cmap("viridis"))
    _cell_grid(fig, hm, clips, batches, by)
    fig.suptitle(title or "AGC sweep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _accuracy_lines(ax, rows: list[dict], clips: list[str], batches: list[int], by: dict,
                    cmap) -> None:
    classes = next((r["num_classes"] for r in rows if r.get("num_classes")), None)
    for i, c in enumerate(clips):
        color = "k" if c == "off" else cmap(i / max(1, len(clips) - 1))
        cells = [by.get((c, b)) for b in batches]
        drawn = [(b, r["val_top1"]) for b, r in zip(batches, cells, strict=True)
                 if r is not None and r["val_top1"] is not None]
        xs, ys = [b for b, _ in drawn], [top1 for _, top1 in drawn]
        ax.plot(xs, ys, "-o" if c != "off" else "--o", color=color, ms=5,
                label=f"clip {c}" if c != "off" else "no clipping")
        bad = [(b, r["val_top1"] or 0) for b, r in zip(batches, cells, strict=True)
               if r is not None and r["status"] in ("diverged", "at chance")]
        if bad:
            ax.scatter([b for b, _ in bad], [top1 for _, top1 in bad], marker="X", s=110,
                       color=color, edgecolor="red", zorder=5)
    if classes:
        ax.axhline(100 / classes, color="grey", lw=1, ls=":",
                   label=f"chance ({100 / classes:.0f}%)")
    ax.scatter([], [], marker="X", s=80, color="w", edgecolor="red", label="diverged / at chance")
    ax.set_xscale("log", base=2)
    lrs = {r["global_batch"]: r["lr"] for r in rows if r.get("lr") is not None}
    ax.set_xticks(batches, [f"{b}\nlr {lrs[b]:.3g}" if b in lrs else str(b) for b in batches])
    ax.minorticks_off()
    ax.set(xlabel="global batch (lr scaled with it)", ylabel="val top-1 (%)", ylim=(0, 102),
           title="Final accuracy per clip factor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.6)


def _cell_grid(fig, hm, clips: list[str], batches: list[int], by: dict) -> None:
    grid = np.full((len(clips), len(batches)), np.nan)
    for (c, b), r in by.items():
        if r["val_top1"] is not None:
            grid[clips.index(c), batches.index(b)] = r["val_top1"]
    im = hm.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    marks = {"diverged": "\nNaN", "at chance": "\nchance", "missing": "\nmissing"}
    for (c, b), r in by.items():
        value = "-" if r["val_top1"] is None else f"{r['val_top1']:.0f}"
        hm.text(batches.index(b), clips.index(c), value + marks.get(r["status"], ""),
                ha="center", va="center", fontsize=8,
                color="w" if (r["val_top1"] or 0) < 60 else "k")
    hm.set_xticks(range(len(batches)), [str(b) for b in batches])
    hm.set_yticks(range(len(clips)), clips)
    hm.set(xlabel="global batch", ylabel="clip factor", title="val top-1 (%) per cell")
    fig.colorbar(im, ax=hm)
