"""Evaluation: exactly one prediction per sample, on one or many processes, and the metrics.

Every process predicts a contiguous range of the split (no padding, so no duplicates under DDP),
then the per-sample results are gathered to every process, ordered by position, and checked: one
prediction for each of the manifest's samples, no gaps, no repeats.
Metrics: top-1, top-5, NLL, expected calibration error, per-class accuracy, confusion matrix,
inference throughput. The eval transform is timm's (`transforms_imagenet_eval`) at the test
resolution, crop fraction, crop mode and interpolation of the model's config.json, with its
mean / std: the same numbers `timm.data.resolve_data_config(..., use_test_size=True)` gives.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch import nn

from pipeline.data.loader import EvalShards, make_loader
from pipeline.data.manifest import SplitInfo
from pipeline.data.transforms import MEAN, STD, eval_transform, normalize
from pipeline.model_config import ModelConfig, ModelError
from pipeline.model_dir import build_from_config, load_weights, model_weights
from pipeline.runtime import compile_model


@dataclass
class Predictions:
    """Per-sample results, ordered by position in the split."""
    index: np.ndarray      # (N,) position in the split
    label: np.ndarray      # (N,)
    top5: np.ndarray       # (N, k) predicted classes, best first (k = min(5, classes))
    prob: np.ndarray       # (N,) softmax probability of the top-1 class
    nll: np.ndarray        # (N,) -log p(label)
    img_per_s: float       # end-to-end throughput: decoding, transform and forward, all processes
    forward_img_per_s: float = float("nan")   # the model's forward passes alone, all processes


@torch.no_grad()
def predict(model: nn.Module, split: SplitInfo, transform, *, batch: int, workers: int,
            device: torch.device, rank: int = 0, world: int = 1,
            autocast: Any | None = None, channels_last: bool = False,
            mean: tuple = MEAN, std: tuple = STD) -> Predictions:
    """Predict every sample of `split` exactly once; with world > 1, call it on every process
    (each reads a contiguous range; the results are gathered to all of them)."""
    model.eval()
    ds = EvalShards(split, transform, rank=rank, world=world, workers=workers, batch=batch)
    loader = make_loader(ds, workers, pin_memory=device.type == "cuda")
    parts: list[dict[str, np.ndarray]] = []
    t_forward, t0 = 0.0, time.perf_counter()
    for b in loader:
        x = normalize(b.images.to(device, non_blocking=True), channels_last, mean, std)
        _sync(device)
        t1 = time.perf_counter()
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(x)
        _sync(device)
        t_forward += time.perf_counter() - t1
        logp = torch.log_softmax(logits.float(), dim=1)
        y = b.labels.to(device)
        if int(y.max()) >= logp.shape[1] or int(y.min()) < 0:
            raise ValueError(f"split '{split.name}' has label {int(y.max())} but the model has "
                             f"{logp.shape[1]} classes: evaluate on the label set it was trained on")
        k = min(5, logp.shape[1])
        top = logp.topk(k, dim=1)
        parts.append({"index": b.index.numpy(), "label": b.labels.numpy(),
                      "top5": top.indices.cpu().numpy(), "prob": top.values[:, 0].exp().cpu().numpy(),
                      "nll": (-logp.gather(1, y[:, None])[:, 0]).cpu().numpy()})
    elapsed = time.perf_counter() - t0
    if world > 1:
        parts = gather_object(parts)            # every process's list, concatenated
        elapsed = max(gather_object([elapsed]))
        t_forward = max(gather_object([t_forward]))
    n = split.num_samples
    if not parts:
        raise RuntimeError(f"evaluation produced no predictions for split '{split.name}' ({n} samples)")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["index"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if len(merged["index"]) != n or not np.array_equal(merged["index"], np.arange(n)):
        raise RuntimeError(f"evaluation produced {len(merged['index'])} predictions for {n} "
                           f"samples of split '{split.name}' (duplicates or gaps)")
    return Predictions(merged["index"], merged["label"], merged["top5"], merged["prob"],
                       merged["nll"], n / max(elapsed, 1e-9), n / max(t_forward, 1e-9))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_metrics(p: Predictions, class_names: list[str], bins: int = 15) -> dict[str, Any]:
    """Top-1/top-5 (%), NLL, ECE, per-class top-1 (%), confusion matrix (rows: actual, columns:
    predicted) and the reliability bins, from predictions."""
    num_classes = len(class_names)
    if len(p.label) and int(p.label.max()) >= num_classes:
        raise ValueError(f"label {int(p.label.max())} but only {num_classes} class names")
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
        "forward_img_per_s": float(p.forward_img_per_s),
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


@dataclass
class EvalSettings:
    """How a model is evaluated: the fields of timm's data config."""
    res: int | tuple[int, int]
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def transform(self):
        return eval_transform(self.res, self.crop_pct, self.interpolation, self.crop_mode,
                              self.mean, self.std)


def eval_settings(config: ModelConfig, test_res: int | None = None,
                  crop_pct: float | None = None, interpolation: str | None = None
                  ) -> EvalSettings:
    """The model's test resolution, crop fraction, crop mode, interpolation, mean and std
    (config.json's `pretrained_cfg`, with pipeline/model_config.py's defaults: timm's, so these
    are the numbers of `resolve_data_config(..., use_test_size=True)`); a recipe value, where
    given, wins."""
    pc = config.pretrained_cfg
    h, w = pc.test_size[-2:]
    res: int | tuple[int, int] = test_res or (h if h == w else (h, w))
    return EvalSettings(res=res, crop_pct=float(crop_pct or pc.test_crop), crop_mode=pc.crop_mode,
                        interpolation=interpolation or pc.interpolation, mean=pc.mean, std=pc.std)


def load_models(folder, wanted: list[str], device: torch.device | str = "cpu"
                ) -> tuple[dict[str, nn.Module], ModelConfig, list[str]]:
    """({label: model}, config, messages) for the weights in `wanted` (ema, raw) that the model
    folder has, each file loaded once; a published folder's single file is labelled `published`."""
    config = ModelConfig.load(folder)
    models, seen, messages = {}, set(), []
    for w in wanted:
        try:
            path, label, message = model_weights(folder, w)
        except ModelError as e:
            messages.append(f"skipping {w} weights: {e}")
            continue
        if path in seen:
            continue
        seen.add(path)
        messages += [message] if message else []
        model = load_weights(build_from_config(config), load_file(str(path)), path, config)
        models[label] = model.to(device).eval()
    return models, config, messages


def validate(models: dict[str, nn.Module], split: SplitInfo, config: ModelConfig, *,
             batch: int, workers: int, device: torch.device, rank: int = 0, world: int = 1,
             autocast: Any | None = None, bins: int = 15, test_res: int | None = None,
             crop_pct: float | None = None, interpolation: str | None = None,
             compile: bool = False) -> dict[str, dict[str, Any]]:
    """Metrics per named model (e.g. {"ema": ..., "raw": ...}) at the config's test settings
    (`test_res`, `crop_pct`, `interpolation` override them). Call on every process. `compile`:
    predict through torch.compile (each model compiled once per process, then reused)."""
    settings = eval_settings(config, test_res, crop_pct, interpolation)
    transform = settings.transform()
    out = {}
    for name, model in models.items():
        preds = predict(compiled(model) if compile else model, split, transform, batch=batch,
                        workers=workers, device=device, rank=rank, world=world, autocast=autocast,
                        mean=settings.mean, std=settings.std)
        out[name] = compute_metrics(preds, config.class_names, bins)
        out[name].update(test_res=settings.res, crop_pct=settings.crop_pct,
                         crop_mode=settings.crop_mode, interpolation=settings.interpolation)
    return out


_COMPILED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def compiled(model: nn.Module) -> nn.Module:
    """`torch.compile(model)`, made once per model object (validation during training calls this
    at every point: the compiled wrapper and its graphs are reused)."""
    if model not in _COMPILED:
        _COMPILED[model] = compile_model(model)
    return _COMPILED[model]


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
