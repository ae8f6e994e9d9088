"""Evaluation: exactly one prediction per sample, on one or many processes, and the metrics.

Every process predicts a contiguous range of the split (no padding, so no duplicates under DDP),
then the per-sample results are gathered and the count is checked against the manifest.
Metrics: top-1, top-5, NLL, expected calibration error, per-class accuracy, confusion matrix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn

from pipeline.data.manifest import SplitInfo
from pipeline.data.reader import EvalShards, make_loader
from pipeline.data.transforms import normalize


@dataclass
class Predictions:
    """Per-sample results, ordered by position in the split."""
    index: np.ndarray      # (N,) position in the split
    label: np.ndarray      # (N,)
    top5: np.ndarray       # (N, k) predicted classes, best first (k = min(5, classes))
    prob: np.ndarray       # (N,) softmax probability of the top-1 class
    nll: np.ndarray        # (N,) -log p(label)
    img_per_s: float       # inference throughput of this run (all processes)


@torch.no_grad()
def predict(model: nn.Module, split: SplitInfo, transform, *, batch: int, workers: int,
            device: torch.device, rank: int = 0, world: int = 1,
            autocast: Optional[Any] = None, channels_last: bool = False) -> Predictions:
    """Predict every sample of `split` once; with world > 1, call on every process."""
    model.eval()
    ds = EvalShards(split, transform, rank=rank, world=world, workers=workers, batch=batch)
    loader = make_loader(ds, workers, pin_memory=device.type == "cuda")
    parts: list[dict[str, np.ndarray]] = []
    n_local, t0 = 0, time.perf_counter()
    for b in loader:
        x = normalize(b["image"].to(device, non_blocking=True), channels_last)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(x)
        logp = torch.log_softmax(logits.float(), dim=1)
        y = b["label"].to(device)
        k = min(5, logp.shape[1])
        top = logp.topk(k, dim=1)
        parts.append({"index": b["index"].numpy(), "label": b["label"].numpy(),
                      "top5": top.indices.cpu().numpy(), "prob": top.values[:, 0].exp().cpu().numpy(),
                      "nll": (-logp.gather(1, y[:, None])[:, 0]).cpu().numpy()})
        n_local += len(b["label"])
    elapsed = time.perf_counter() - t0
    if world > 1:
        parts = gather_object(parts)
        elapsed = max(gather_object([elapsed]))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    order = np.argsort(merged["index"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    n = split.num_samples
    if len(merged["index"]) != n or not np.array_equal(merged["index"], np.arange(n)):
        raise RuntimeError(f"evaluation produced {len(merged['index'])} predictions for {n} "
                           f"samples of split '{split.name}' (duplicates or gaps)")
    return Predictions(merged["index"], merged["label"], merged["top5"], merged["prob"],
                       merged["nll"], n / max(elapsed, 1e-9))


def compute_metrics(p: Predictions, class_names: list[str], bins: int = 15) -> dict[str, Any]:
    """Top-1/top-5 (%), NLL, ECE, per-class accuracy and confusion matrix from predictions."""
    num_classes = len(class_names)
    correct1 = p.top5[:, 0] == p.label
    correct5 = (p.top5 == p.label[:, None]).any(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (p.label, p.top5[:, 0]), 1)
    per_class = {}
    for c, name in enumerate(class_names):
        mask = p.label == c
        per_class[name] = float(correct1[mask].mean() * 100) if mask.any() else None
    calib = calibration(p.prob, correct1, bins)
    return {
        "num_samples": int(len(p.label)),
        "top1": float(correct1.mean() * 100),
        "top5": float(correct5.mean() * 100),
        "nll": float(p.nll.mean()),
        "ece": calib["ece"],
        "img_per_s": float(p.img_per_s),
        "per_class_top1": per_class,
        "confusion": confusion.tolist(),
        "calibration": calib["bins"],
    }


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the reliability data."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        count = int(m.sum())
        conf = float(confidence[m].mean()) if count else None
        acc = float(correct[m].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        rows.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]),
                     "count": count, "confidence": conf, "accuracy": acc})
    return {"ece": float(ece), "bins": rows}


def eval_settings(config: dict[str, Any], test_res: Optional[int] = None,
                  crop_pct: Optional[float] = None, interpolation: Optional[str] = None
                  ) -> tuple[int, float, str, str]:
    """(resolution, crop_pct, interpolation, crop_mode): the recipe's value where set, else the
    one that travels with the checkpoint's config.json."""
    pc = config["pretrained_cfg"]
    res = test_res or pc.get("test_input_size", pc["input_size"])[-1]
    crop = crop_pct or pc.get("test_crop_pct", pc.get("crop_pct", 0.875))
    return int(res), float(crop), interpolation or pc.get("interpolation", "bicubic"), \
        pc.get("crop_mode", "center")


def validate(models: dict[str, nn.Module], split: SplitInfo, config: dict[str, Any], *,
             batch: int, workers: int, device: torch.device, rank: int = 0, world: int = 1,
             autocast: Optional[Any] = None, bins: int = 15) -> dict[str, dict[str, Any]]:
    """Metrics per named model (e.g. {"ema": ..., "raw": ...}) at the config's test settings."""
    from pipeline.data.transforms import eval_transform
    res, crop, interp, mode = eval_settings(config)
    transform = eval_transform(res, crop, interp, mode)
    out = {}
    for name, model in models.items():
        preds = predict(model, split, transform, batch=batch, workers=workers, device=device,
                        rank=rank, world=world, autocast=autocast)
        out[name] = compute_metrics(preds, list(config.get("label_names") or
                                                [str(i) for i in range(config["num_classes"])]), bins)
        out[name].update(test_res=res, crop_pct=crop, interpolation=interp)
    return out


def write_plots(folder, result: dict[str, Any], class_names: list[str]) -> None:
    """Per-class accuracy, confusion pairs and calibration as CSV (for `dvc plots`) and PNG."""
    import csv
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "top1"])
        for name, acc in result["per_class_top1"].items():
            w.writerow([name, "" if acc is None else f"{acc:.4f}"])
    confusion = np.array(result["confusion"])
    with open(folder / "confusion.csv", "w", newline="") as f:   # DVC's confusion template
        w = csv.writer(f)
        w.writerow(["actual", "predicted", "count"])
        for i, j in zip(*np.nonzero(confusion)):
            w.writerow([class_names[i], class_names[j], int(confusion[i, j])])
    with open(folder / "calibration.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["confidence", "accuracy", "count"])
        for row in result["calibration"]:
            if row["count"]:
                w.writerow([f"{row['confidence']:.4f}", f"{row['accuracy']:.4f}", row["count"]])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = [r for r in result["calibration"] if r["count"]]
    axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    axes[0].plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-",
                 label=f"model (ECE {result['ece']:.3f})")
    axes[0].set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    axes[0].legend()
    if len(class_names) <= 50:
        im = axes[1].imshow(confusion, cmap="Blues")
        axes[1].set(xticks=range(len(class_names)), yticks=range(len(class_names)),
                    xticklabels=class_names, yticklabels=class_names,
                    xlabel="predicted", ylabel="actual", title="Confusion matrix")
        fig.colorbar(im, ax=axes[1])
    else:
        accs = [a for a in result["per_class_top1"].values() if a is not None]
        axes[1].hist(accs, bins=20)
        axes[1].set(xlabel="per-class top-1 (%)", ylabel="classes", title="Per-class accuracy")
    fig.tight_layout()
    fig.savefig(folder / "evaluation.png", dpi=100)
    plt.close(fig)
