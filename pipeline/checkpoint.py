"""Atomic checkpoints for exact resume, and model folders (weights + config) between stages.

A checkpoint is a folder `checkpoints/<fingerprint>/step-00001234/` holding
    model.safetensors, ema.safetensors   weights (safetensors only; no pickle)
    train_state.pt                       optimizer, scheduler, data cursor, step: tensors and plain
                                         data, loaded with torch.load(weights_only=True)
    meta.json                            written last; its presence marks the checkpoint complete
It is written under a temporary name and renamed, so a crash while saving leaves the previous
checkpoint as it was. `fingerprint` hashes what makes a run resumable (recipe section, data,
initial weights), so `--resume auto` never continues a run from a different recipe.

A model folder (`<stage out>/model/`) is what the next stage reads:
    model.safetensors, ema.safetensors (if EMA is on), config.json (timm's hub format, plus our
    `nfnet_pipeline` block: variant, class names, stage, step, resolutions)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn


STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _state_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: save plain contiguous CPU copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module,
                    ema: Optional[nn.Module], train_state: dict[str, Any],
                    meta: dict[str, Any], keep: int) -> Path:
    """Write `root/step-<step>` atomically, then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", suffix=".tmp", dir=root))
    try:
        save_file(_state_for_save(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_state_for_save(ema), str(tmp / "ema.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():                      # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, ema: Optional[nn.Module]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `model` (and `ema`); return (train_state, meta)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise CheckpointError(f"{path} has no ema.safetensors but the recipe uses EMA")
        ema.load_state_dict(load_file(str(ema_file)))
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return train_state, json.loads((path / "meta.json").read_text())


# ------------------------------------------------------------------------------------------------
# Model folders
# ------------------------------------------------------------------------------------------------

def save_model_dir(out: str | os.PathLike, model: nn.Module, ema: Optional[nn.Module],
                   config: dict[str, Any]) -> Path:
    """Write weights and config.json into `out` (replaced atomically as a whole folder)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(_state_for_save(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_state_for_save(ema), str(tmp / "ema.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"no config.json in {folder}: expected a model folder written by "
                              f"the pretrain/finetune stage or the publish stage")
    return json.loads(cfg.read_text())


def weights_file(folder: str | os.PathLike, weights: str) -> Path:
    """`ema` or `raw` weights of a model folder (a published folder has only model.safetensors)."""
    folder = Path(folder)
    name = "ema.safetensors" if weights == "ema" else "model.safetensors"
    path = folder / name
    if not path.is_file():
        if weights == "ema" and (folder / "model.safetensors").is_file() and \
                not (folder / "ema.safetensors").exists():
            raise CheckpointError(f"{folder} has no EMA weights (ema.safetensors); use raw "
                                  f"weights (weights: raw) or a run with ema_decay set")
        raise CheckpointError(f"{path} not found")
    return path


def build_from_config(config: dict[str, Any], num_classes: Optional[int] = None,
                      **kwargs: Any) -> nn.Module:
    """The timm model a config.json describes (architecture + model_args), untrained."""
    return timm.create_model(config["architecture"], pretrained=False,
                             num_classes=num_classes if num_classes is not None
                             else config["num_classes"],
                             **config.get("model_args", {}), **kwargs)


def load_model_dir(folder: str | os.PathLike, weights: str = "ema",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load the model of a model folder; checks that the tensors match."""
    config = read_model_config(folder)
    model = build_from_config(config)
    state = load_file(str(weights_file(folder, weights)), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match architecture "
                              f"{config['architecture']} {config.get('model_args', {})}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), config


def default_crop_pct(test_res: int, crop_mode: str) -> float:
    """DeepMind's NFNet eval resizes to (S + 32)^2 ignoring aspect ("squash"), then crops S;
    batch-norm ResNets are evaluated the standard way: shorter side to S / 0.875, centre crop S."""
    return test_res / (test_res + 32) if crop_mode == "squash" else 0.875


def model_config(model: nn.Module, arch: str, model_args: dict, class_names: list[str],
                 train_res: int, test_res: int, crop_pct: Optional[float], interpolation: str,
                 extra: dict[str, Any], crop_mode: str = "squash") -> dict[str, Any]:
    """config.json in timm's hub format (so `timm.create_model('local-dir:...')` works).
    `crop_pct` None: the default of `crop_mode` (see default_crop_pct)."""
    crop_pct = crop_pct or default_crop_pct(test_res, crop_mode)
    from pipeline.data.transforms import MEAN, STD
    timm_cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "architecture": arch,
        "model_args": model_args,
        "num_classes": len(class_names),
        "num_features": int(getattr(model, "num_features", 0)),
        "global_pool": "avg",
        "label_names": list(class_names),
        "pretrained_cfg": {
            "input_size": [3, train_res, train_res],
            "test_input_size": [3, test_res, test_res],
            "crop_pct": crop_pct,
            "test_crop_pct": crop_pct,
            "crop_mode": crop_mode,
            "interpolation": interpolation,
            "mean": list(MEAN),
            "std": list(STD),
            "classifier": timm_cfg.get("classifier", "head.fc"),
            "first_conv": timm_cfg.get("first_conv", "stem.conv1"),
        },
        "nfnet_pipeline": extra,
    }
