"""The paper's two ablations on our pipeline: running cells, collecting, measuring, tables, plots.

- Cells: `run_pretrain` runs the real pretrain stage (behind a launcher: python, or accelerate
  launch) unless the run folder already holds a finished run with the same recipe, shards and
  overrides (`is_done`), so a sweep resumes and grows cell by cell.
- AGC sweep (paper Sec. 4.1, Figs. 2 and 7): clip factor x global batch, each cell a real pretrain
  run (the lr scales with the batch). `collect_agc` reads the runs' resolved recipes and metrics and
  flags divergence: a non-finite loss or validation NLL, skipped (non-finite) steps, or top-1 at
  chance. `write_agc` writes the table (CSV/JSON), a wide CSV for `dvc plots` and one PNG.
- NF vs BN at equal budget: two pretrain runs of the same recipe apart from the model.
  `measure_run` adds what the training metrics do not hold: top-1 on the training split (eval
  transform, eval mode) for the train/eval gap, for BN models top-1 on val with batch statistics
  (train-mode BN) against running statistics (eval mode), the activation memory saved for backward
  per image, and the forward+backward time of one micro-batch. `write_compare` writes the table
  and one PNG.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.io import atomic_write_text

CHANCE_MARGIN = 5.0        # top-1 within this many points of chance counts as "at chance"
STAGES = Path(__file__).resolve().parents[1] / "stages"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_run(run: str | Path) -> dict[str, Any]:
    """A pretrain/finetune output folder as plain data: its resolved recipe section, derived
    values, metrics.json (None if the run left none) and the class count of its model."""
    run = Path(run)
    resolved_path = run / "recipe.resolved.yaml"
    if not resolved_path.is_file():
        raise FileNotFoundError(f"{run} has no recipe.resolved.yaml: not a training run folder")
    resolved = yaml.safe_load(resolved_path.read_text())
    stage = "pretrain" if "pretrain" in resolved else "finetune"
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    config_path = run / "model" / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return {"run": str(run), "stage": stage, "section": resolved[stage],
            "derived": resolved.get("resolved", {}), "metrics": metrics,
            "num_classes": config.get("num_classes"), "config": config}


def divergence(metrics: Optional[dict], num_classes: Optional[int]) -> str:
    """'ok', 'diverged' (non-finite loss/NLL or skipped non-finite steps), 'at chance' or 'missing'."""
    if metrics is None:
        return "missing"
    nll = metrics.get("val_nll_ema", metrics.get("val_nll_raw"))
    if (not _finite(metrics.get("train_loss")) or (nll is not None and not _finite(nll))
            or metrics.get("skipped_steps", 0) > 0):
        return "diverged"
    top1 = metrics.get("val_top1_ema", metrics.get("val_top1_raw"))
    if num_classes and top1 is not None and top1 <= 100.0 / num_classes + CHANCE_MARGIN:
        return "at chance"
    return "ok"


# ------------------------------------------------------------------------------------------------
# Running cells: one real pretrain-stage run each, skipped when already done with the same settings
# ------------------------------------------------------------------------------------------------

def parse_clip(text: str) -> Optional[float]:
    """'0.04' -> 0.04; 'null' / 'off' / 'none' -> None (no clipping)."""
    return None if text.strip().lower() in ("null", "off", "none") else float(text)


def cell_dir(root: str | Path, clip: Optional[float], batch: int) -> Path:
    return Path(root) / f"b{batch}-clip{'null' if clip is None else f'{clip:g}'}"


def cell_overrides(clip: Optional[float], batch: int, extra: list[str]) -> list[str]:
    return [f"pretrain.clip_factor={'null' if clip is None else f'{clip:g}'}",
            f"pretrain.global_batch={batch}", *extra]


def pretrain_command(launcher: str, recipe: str, shards: str, out: Path,
                     overrides: list[str]) -> list[str]:
    """The pretrain stage's command line; launcher `python` (this interpreter) or e.g.
    `accelerate launch --multi_gpu --num_processes 8`."""
    words = shlex.split(launcher)
    if words in (["python"], ["python3"]):
        words = [sys.executable]
    return [*words, str(STAGES / "pretrain.py"), "--recipe", recipe, "--shards", str(shards),
            "--out", str(out), *overrides]


def is_done(run: Path, recipe: str, shards: str, overrides: list[str]) -> bool:
    """A finished run of exactly these settings: metrics.json written, and the resolved recipe
    names the same recipe file, shards and overrides."""
    resolved = run / "recipe.resolved.yaml"
    if not (run / "metrics.json").is_file() or not resolved.is_file():
        return False
    doc = yaml.safe_load(resolved.read_text())
    return (doc.get("recipe") == recipe and doc.get("overrides") == list(overrides)
            and str(doc.get("resolved", {}).get("shards")) == str(shards))


def _log(text: str) -> None:
    print(text, flush=True)                # a stage's log under DVC is a pipe: show it as it comes


def run_pretrain(launcher: str, recipe: str, shards: str, out: Path, overrides: list[str],
                 log=_log) -> str:
    """Run one cell unless it is done; 'done', 'ran' or 'failed (exit N)'. A failed cell is a
    result too (the table shows it), so the sweep goes on."""
    if is_done(out, recipe, shards, overrides):
        log(f"[ablation] {out}: done with these settings, kept")
        return "done"
    cmd = pretrain_command(launcher, recipe, shards, out, overrides)
    log(f"[ablation] {' '.join(shlex.quote(c) for c in cmd)}")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = "\n".join(line for line in p.stdout.splitlines()[-14:] if "it/s" not in line)
    log(tail)
    return "ran" if p.returncode == 0 else f"failed (exit {p.returncode})"


# ------------------------------------------------------------------------------------------------
# AGC sweep
# ------------------------------------------------------------------------------------------------

AGC_FIELDS = ["clip", "clip_factor", "global_batch", "lr", "steps", "val_top1", "val_top1_raw",
              "val_nll", "train_loss", "skipped_steps", "status", "train_time_s", "run"]


def clip_label(clip: Optional[float]) -> str:
    return "off" if clip is None else f"{clip:g}"


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


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else
                        (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])) for k in fields})
    return buf.getvalue()


def write_agc(rows: list[dict], out: str | Path, title: str = "") -> dict[str, Path]:
    """agc_sweep.csv / .json (the table), agc_sweep_dvc.csv (global_batch x one column of top-1
    per clip factor, for `dvc plots`) and agc_sweep.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "agc_sweep.csv", _csv(rows, AGC_FIELDS))
    atomic_write_text(out / "agc_sweep.json", json.dumps(rows, indent=1, default=str) + "\n")
    clips = list(dict.fromkeys(clip_label(r["clip_factor"]) for r in rows))
    batches = sorted({r["global_batch"] for r in rows})
    wide = []
    for b in batches:
        line = {"global_batch": b}
        for r in rows:
            if r["global_batch"] == b:
                line[f"clip_{clip_label(r['clip_factor'])}"] = r["val_top1"]
        wide.append(line)
    atomic_write_text(out / "agc_sweep_dvc.csv",
                      _csv(wide, ["global_batch"] + [f"clip_{c}" for c in clips]))
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
    classes = next((r["num_classes"] for r in rows if r.get("num_classes")), None)
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(clips):
        color = "k" if c == "off" else cmap(i / max(1, len(clips) - 1))
        cells = [by.get((c, b)) for b in batches]
        xs = [b for b, r in zip(batches, cells) if r is not None and r["val_top1"] is not None]
        ys = [r["val_top1"] for r in cells if r is not None and r["val_top1"] is not None]
        ax.plot(xs, ys, "-o" if c != "off" else "--o", color=color, ms=5,
                label=f"clip {c}" if c != "off" else "no clipping")
        bad = [(b, r["val_top1"] or 0) for b, r in zip(batches, cells)
               if r is not None and r["status"] in ("diverged", "at chance")]
        if bad:
            ax.scatter(*zip(*bad), marker="X", s=110, color=color, edgecolor="red", zorder=5)
    if classes:
        ax.axhline(100 / classes, color="grey", lw=1, ls=":", label=f"chance ({100 / classes:.0f}%)")
    ax.scatter([], [], marker="X", s=80, color="w", edgecolor="red", label="diverged / at chance")
    ax.set_xscale("log", base=2)
    lrs = {r["global_batch"]: r["lr"] for r in rows if r.get("lr") is not None}
    ax.set_xticks(batches, [f"{b}\nlr {lrs[b]:.3g}" if b in lrs else str(b) for b in batches])
    ax.minorticks_off()
    ax.set(xlabel="global batch (lr scaled with it)", ylabel="val top-1 (%)", ylim=(0, 102),
           title="Final accuracy per clip factor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.6)
    grid = np.full((len(clips), len(batches)), np.nan)
    for (c, b), r in by.items():
        if r["val_top1"] is not None:
            grid[clips.index(c), batches.index(b)] = r["val_top1"]
    im = hm.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (c, b), r in by.items():
        mark = {"diverged": "\nNaN", "at chance": "\nchance", "missing": "\nmissing"}.get(r["status"], "")
        value = "-" if r["val_top1"] is None else f"{r['val_top1']:.0f}"
        hm.text(batches.index(b), clips.index(c), value + mark, ha="center", va="center",
                fontsize=8, color="w" if (r["val_top1"] or 0) < 60 else "k")
    hm.set_xticks(range(len(batches)), [str(b) for b in batches])
    hm.set_yticks(range(len(clips)), clips)
    hm.set(xlabel="global batch", ylabel="clip factor", title="val top-1 (%) per cell")
    fig.colorbar(im, ax=hm)
    fig.suptitle(title or "AGC sweep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# NF vs BN
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def bn_train_mode_top1(model: nn.Module, split, config: dict, batch: int) -> float:
    """Top-1 (%) on `split` with BN layers using each batch's own statistics (as in training),
    on a copy of the model (its running statistics are not touched); dropout stays off."""
    from pipeline.data.reader import EvalShards, make_loader
    from pipeline.evaluate import eval_settings
    settings = eval_settings(config)
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    mean = torch.tensor(settings.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(settings.std).view(1, 3, 1, 1) * 255
    ds = EvalShards(split, settings.transform(), rank=0, world=1, workers=1, batch=batch)
    correct = total = 0
    for b in make_loader(ds, 0):
        x = (b["image"].float() - mean) / std
        correct += int((net(x).argmax(1) == b["label"]).sum())
        total += len(b["label"])
    return 100.0 * correct / total


def saved_activation_mb(model: nn.Module, res: int, batches: tuple[int, int] = (8, 24)) -> float:
    """Memory autograd saves for backward, per image (MiB): the difference between two batch
    sizes, so weights and per-batch constants (standardised WS weights) cancel out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    net = copy.deepcopy(model).train()
    sizes = []
    for n in batches:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(torch.randn(n, 3, res, res))
        sizes.append(sum(seen.values()))
        del out
    return (sizes[1] - sizes[0]) / (batches[1] - batches[0]) / 2**20


def step_times(models: dict[str, nn.Module], res: int, batch: int, repeats: int = 5,
               warmup: int = 2) -> dict[str, float]:
    """Median seconds of one forward + backward on a (batch, 3, res, res) input, per model; the
    models take turns, so a busy machine slows all of them alike."""
    nets = {k: copy.deepcopy(m).train() for k, m in models.items()}
    x = torch.randn(batch, 3, res, res)
    times: dict[str, list[float]] = {k: [] for k in nets}
    for i in range(warmup + repeats):
        for k, net in nets.items():
            t0 = time.perf_counter()
            net(x).float().logsumexp(1).mean().backward()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
            net.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_run(run: str | Path, shards: str | Path, weights: str = "ema",
                batch: Optional[int] = None) -> dict[str, Any]:
    """Accuracy (val and train split, eval mode), for BN models val accuracy with batch statistics,
    the training metrics (time, peak memory) and model facts of one pretrain run."""
    from pipeline.checkpoint import load_model_dir
    from pipeline.data.manifest import load_split
    from pipeline.evaluate import validate
    from pipeline.plan import training_flops_per_image
    from pipeline.variants import has_batchnorm

    r = read_run(run)
    model, config = load_model_dir(Path(run) / "model", weights)
    section, m = r["section"], r["metrics"] or {}
    batch = batch or section["micro_batch"]
    splits = {s: load_split(shards, s) for s in ("train", "val")}
    acc = {s: validate({weights: model}, sp, config, batch=batch, workers=1,
                       device=torch.device("cpu"))[weights]["top1"] for s, sp in splits.items()}
    bn = has_batchnorm(model)
    res = section["train_res"]
    row = {
        "model": f"{config['nfnet_pipeline'].get('variant')} ({'BN' if bn else 'NF'})",
        "variant": config["nfnet_pipeline"].get("variant"), "family": "BN" if bn else "NF",
        "architecture": config["architecture"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_gflops_per_image": training_flops_per_image(model, res) / 1e9,
        "val_top1": acc["val"], "train_split_top1": acc["train"],
        "train_eval_gap": acc["train"] - acc["val"],
        "val_top1_bn_batch_stats": bn_train_mode_top1(model, splits["val"], config, batch) if bn else None,
        "val_top1_metrics": m.get(f"val_top1_{weights}"),
        "train_time_s": m.get("train_time_s"), "img_per_s": m.get("img_per_s"),
        "peak_mem_mb": m.get("peak_mem_mb"), "train_loss": m.get("train_loss"),
        "steps": m.get("steps"), "global_batch": section["global_batch"],
        "micro_batch": section["micro_batch"], "train_res": res, "epochs": section.get("epochs"),
        "saved_activation_mb_per_image": saved_activation_mb(model, res),
        "weights": weights, "run": str(run), "_model": model,
    }
    if bn:
        row["bn_mode_gap"] = row["val_top1"] - row["val_top1_bn_batch_stats"]
    return row


COMPARE_FIELDS = ["model", "architecture", "params_m", "train_gflops_per_image", "epochs",
                  "global_batch", "steps", "val_top1", "train_split_top1", "train_eval_gap",
                  "val_top1_bn_batch_stats", "bn_mode_gap", "train_time_s", "step_time_ms",
                  "peak_mem_mb", "saved_activation_mb_per_image", "train_loss", "run"]


def compare(runs: list[str | Path], shards: str | Path, weights: str = "ema",
            timing_repeats: int = 5) -> list[dict[str, Any]]:
    """`measure_run` for each run, plus interleaved forward+backward timing at the runs' own
    micro-batch and resolution."""
    rows = [measure_run(r, shards, weights) for r in runs]
    res, batch = rows[0]["train_res"], rows[0]["micro_batch"]
    times = (step_times({str(i): r["_model"] for i, r in enumerate(rows)}, res, batch,
                        repeats=timing_repeats) if timing_repeats > 0 else {})
    for i, r in enumerate(rows):
        r["step_time_ms"] = 1000 * times[str(i)] if str(i) in times else None
        r["step_time_batch"] = batch
        del r["_model"]
    return rows


def write_compare(rows: list[dict], out: str | Path, title: str = "") -> dict[str, Path]:
    """nf_vs_bn.csv / .json and nf_vs_bn.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "nf_vs_bn.csv", _csv(rows, COMPARE_FIELDS))
    atomic_write_text(out / "nf_vs_bn.json", json.dumps(rows, indent=1, default=str) + "\n")
    plot_compare(rows, out / "nf_vs_bn.png", title)
    return {"csv": out / "nf_vs_bn.csv", "json": out / "nf_vs_bn.json", "png": out / "nf_vs_bn.png"}


def plot_compare(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Six panels: accuracy (val in eval mode, train split, val with BN batch statistics), the
    gaps, whole-run time, one forward+backward, process peak memory, saved activations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    colors = ["tab:blue" if r["family"] == "NF" else "tab:orange" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))

    def bars(ax, values, labels, ylabel, ttl, fmt="{:.1f}"):
        width = 0.8 / len(values)
        for j, (vals, lab) in enumerate(zip(values, labels)):
            v = [np.nan if a is None else a for a in vals]
            bs = ax.bar(x - 0.4 + width * (j + 0.5), v, width, label=lab, color=colors,
                        alpha=1.0 - 0.3 * j, hatch=["", "//", ".."][j % 3], edgecolor="k")
            for b, a in zip(bs, v):
                if not np.isnan(a):
                    ax.annotate(fmt.format(a), (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, names, fontsize=8)
        ax.set(ylabel=ylabel, title=ttl)
        if len(values) > 1:
            ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3, axis="y")

    bars(axes[0, 0], [[r["val_top1"] for r in rows], [r["train_split_top1"] for r in rows],
                      [r.get("val_top1_bn_batch_stats") for r in rows]],
         ["val (eval mode)", "train split (eval mode)", "val, BN with batch statistics"],
         "top-1 (%)", "Accuracy")
    axes[0, 0].set_ylim(0, 109)
    bars(axes[0, 1], [[r["train_eval_gap"] for r in rows], [r.get("bn_mode_gap") for r in rows]],
         ["train split - val", "BN: eval mode - batch statistics"], "points", "Gaps", "{:+.2f}")
    axes[0, 1].axhline(0, color="k", lw=0.8)
    bars(axes[0, 2], [[r["train_time_s"] for r in rows]], ["whole run"], "seconds",
         "Training time, whole run (shared CPU: noisy)", "{:.0f}")
    bars(axes[1, 0], [[r.get("step_time_ms") for r in rows]], ["fwd+bwd"], "ms",
         f"One forward+backward, {rows[0].get('step_time_batch', '')} images (interleaved, median)",
         "{:.1f}")
    bars(axes[1, 1], [[r["peak_mem_mb"] for r in rows]], ["peak"], "MiB",
         "peak_mem_mb (CPU: process peak RSS)", "{:.0f}")
    bars(axes[1, 2], [[r["saved_activation_mb_per_image"] for r in rows]], ["saved"], "MiB / image",
         "Activations saved for backward", "{:.3f}")
    fig.suptitle(title or "NF vs BN at equal budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
