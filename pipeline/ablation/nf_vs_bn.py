"""NF vs BN at equal budget: two pretrain runs of the same recipe apart from the model, measured.

`measure_run` adds what the training metrics do not hold: top-1 on the training split (eval
transform, eval mode) for the train/eval gap, for BN models top-1 on val with batch statistics
(train-mode BN) against running statistics (eval mode), the activation memory saved for backward
per image, and the forward+backward time of one micro-batch. `write_compare` writes the table and
one PNG. Every accuracy goes through the project's one evaluation path (`pipeline.evaluate`).
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.ablation.runs import read_run
from pipeline.ablation.table import write_table
from pipeline.data.manifest import SplitInfo, load_split
from pipeline.evaluate import compute_metrics, eval_settings, predict, validate
from pipeline.model_config import ModelConfig
from pipeline.model_dir import load_model_dir
from pipeline.plan import training_flops_per_image
from pipeline.variants import has_batchnorm

COMPARE_FIELDS = ["model", "architecture", "params_m", "train_gflops_per_image", "epochs",
                  "global_batch", "steps", "val_top1", "train_split_top1", "train_eval_gap",
                  "val_top1_bn_batch_stats", "bn_mode_gap", "train_time_s", "step_time_ms",
                  "peak_mem_mb", "saved_activation_mb_per_image", "train_loss", "run"]


class BatchStatsBN(nn.Module):
    """A copy of `model` whose BN layers normalise with each batch's own statistics, as in
    training, while everything else (dropout, stochastic depth) stays in eval mode.

    `predict` calls `model.eval()` before its loop, which would switch BN to its running
    statistics; so `train(mode)` here ignores the mode it is asked for and always sets this mixed
    state. The copy's running statistics drift as batches pass; the original's are not touched."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.train()

    def train(self, mode: bool = True) -> BatchStatsBN:
        super().train(False)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def batch_stats_top1(model: nn.Module, split: SplitInfo, config: ModelConfig, *, batch: int,
                     workers: int = 0, device: torch.device | None = None) -> float:
    """Top-1 (%) on `split` with BN layers using each batch's statistics (`BatchStatsBN`), at the
    checkpoint's eval settings; for a model without BN, the same number as `validate`."""
    device = device or torch.device("cpu")
    settings = eval_settings(config)
    preds = predict(BatchStatsBN(model).to(device), split, settings.transform(), batch=batch,
                    workers=workers, device=device, mean=settings.mean, std=settings.std)
    return compute_metrics(preds, config.class_names)["top1"]


def saved_activation_mb(model: nn.Module, res: int, batches: tuple[int, int] = (8, 24)) -> float:
    """Memory autograd saves for backward, per image (MiB): the difference between two batch
    sizes, so weights and per-batch constants (standardised WS weights) cancel out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    net = copy.deepcopy(model).train()
    sizes = []
    for n in batches:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
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
                batch: int | None = None, workers: int = 1) -> dict[str, Any]:
    """Accuracy (val and train split, eval mode), for BN models val accuracy with batch statistics,
    the training metrics (time, peak memory) and model facts of one pretrain run."""
    r = read_run(run)
    model, config = load_model_dir(Path(run) / "model", weights)
    section, m = r["section"], r["metrics"] or {}
    batch = batch or section["micro_batch"]
    cpu = torch.device("cpu")
    splits = {s: load_split(shards, s) for s in ("train", "val")}
    acc = {s: validate({weights: model}, sp, config, batch=batch, workers=workers,
                       device=cpu)[weights]["top1"] for s, sp in splits.items()}
    bn = has_batchnorm(model)
    res = section["train_res"]
    variant = config.variant
    row = {
        "model": f"{variant} ({'BN' if bn else 'NF'})", "variant": variant,
        "family": "BN" if bn else "NF", "architecture": config.architecture,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_gflops_per_image": training_flops_per_image(model, res) / 1e9,
        "val_top1": acc["val"], "train_split_top1": acc["train"],
        "train_eval_gap": acc["train"] - acc["val"],
        "val_top1_bn_batch_stats": (batch_stats_top1(model, splits["val"], config, batch=batch,
                                                     workers=workers, device=cpu)
                                    if bn else None),
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
    write_table(rows, COMPARE_FIELDS, out, "nf_vs_bn")
    plot_compare(rows, out / "nf_vs_bn.png", title)
    return {"csv": out / "nf_vs_bn.csv", "json": out / "nf_vs_bn.json", "png": out / "nf_vs_bn.png"}


def plot_compare(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Six panels: accuracy (val in eval mode, train split, val with BN batch statistics), the
    gaps, whole-run time, one forward+backward, process peak memory, saved activations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))

    def bars(ax, values: list[list], labels: list[str], ylabel: str, ttl: str, fmt="{:.1f}"):
        _bars(ax, rows, values, labels, ylabel, ttl, fmt)

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
    bars(axes[1, 2], [[r["saved_activation_mb_per_image"] for r in rows]], ["saved"],
         "MiB / image", "Activations saved for backward", "{:.3f}")
    fig.suptitle(title or "NF vs BN at equal budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax, rows: list[dict], values: list[list], labels: list[str], ylabel: str, title: str,
          fmt: str) -> None:
    """One group of bars per run (NF blue, BN orange), one bar per series in `values`, each
    annotated with its value; None draws no bar."""
    x = np.arange(len(rows))
    colors = ["tab:blue" if r["family"] == "NF" else "tab:orange" for r in rows]
    width = 0.8 / len(values)
    for j, (vals, lab) in enumerate(zip(values, labels, strict=True)):
        v = [np.nan if a is None else a for a in vals]
        bs = ax.bar(x - 0.4 + width * (j + 0.5), v, width, label=lab, color=colors,
                    alpha=1.0 - 0.3 * j, hatch=["", "//", ".."][j % 3], edgecolor="k")
        for b, a in zip(bs, v, strict=True):
            if not np.isnan(a):
                ax.annotate(fmt.format(a), (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["model"] for r in rows], fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    if len(values) > 1:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
