"""Atomic checkpoints for exact resume, and model folders (weights + config) between stages.

A checkpoint is a folder `checkpoints/<fingerprint>/step-00001234/` holding
    model.safetensors, ema.safetensors   weights (safetensors only; no pickle)
    train_state.pt                       optimizer, scheduler, data cursor, step: tensors and plain
                                         data, loaded with torch.load(weights_only=True)
    dvclive/ (optional)                  the run's dvclive logs up to this step
    meta.json                            written last; its presence marks the checkpoint complete
It is written under a temporary name and renamed, so a crash while saving leaves the previous
checkpoint as it was (a full disk too: io.WriteError names the folder and the bytes it needs).
`fingerprint` hashes what makes a run resumable (recipe settings, data, initial weights:
pipeline/resume.py), so `--resume auto` never continues a run with other settings.

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
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import std_conv
from pipeline.data.transforms import MEAN, STD
from pipeline.files import atomic_dir

STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _state_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: save plain contiguous CPU copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state: what writing it takes, less headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module,
                    ema: nn.Module | None, train_state: dict[str, Any],
                    meta: dict[str, Any], keep: int, logs: Path | None = None) -> Path:
    """Write `root/step-<step>` atomically (with a copy of the folder `logs`, if it exists),
    then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    needs = tensor_bytes([m.state_dict() for m in (model, ema) if m is not None])
    with atomic_dir(final, what=f"the checkpoint of step {step}",
                    needs=needs + tensor_bytes(train_state)) as tmp:
        save_file(_state_for_save(model), str(tmp / "model.safetensors"))    # one CPU copy at a time
        if ema is not None:
            save_file(_state_for_save(ema), str(tmp / "ema.safetensors"))
        with open(tmp / "train_state.pt", "wb") as f:     # a Python file: a full disk is an
            torch.save(train_state, f)                      # OSError (torch's own writer: none)
        if logs is not None and logs.is_dir():
            shutil.copytree(logs, tmp / logs.name)
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
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


def load_checkpoint(path: str | os.PathLike, model: nn.Module, ema: nn.Module | None
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

def save_model_dir(out: str | os.PathLike, model: nn.Module, ema: nn.Module | None,
                   config: dict[str, Any]) -> Path:
    """Write weights and config.json into `out`, replacing the folder as a whole (io.atomic_dir)."""
    needs = tensor_bytes([m.state_dict() for m in (model, ema) if m is not None])
    with atomic_dir(out, what="the model folder", needs=needs) as tmp:
        save_file(_state_for_save(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_state_for_save(ema), str(tmp / "ema.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def read_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"no config.json in {folder}: expected a model folder written by "
                              f"the pretrain/finetune stage or the publish stage")
    return json.loads(cfg.read_text())


def class_names_of(config: dict[str, Any]) -> list[str]:
    """The model's class names as strings (its index numbers where config.json has none)."""
    return [str(n) for n in config.get("label_names") or range(config["num_classes"])]


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


def build_from_config(config: dict[str, Any], num_classes: int | None = None,
                      **kwargs: Any) -> nn.Module:
    """The timm model a config.json describes (architecture + model_args), untrained. A DeepMind
    NFNet gets timm's closest weight standardisation (std_conv_eps 1e-10) when its model_args do
    not set one (timm's and the Hub's dm_nfnet configs), as its exported config.json will say."""
    arch = config["architecture"]
    return timm.create_model(arch, pretrained=False,
                             num_classes=num_classes if num_classes is not None
                             else config["num_classes"],
                             **std_conv.rebuild_args(arch, config.get("model_args", {})), **kwargs)


def weights_mismatch(model: nn.Module, state: dict[str, torch.Tensor],
                     may_miss: str | None = None) -> str | None:
    """None when `state` fits `model` (every tensor name and shape), else what differs.
    `may_miss`: a module prefix (a new head) whose tensors the state may lack."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(k for k in set(expected) - set(got)
                     if not (may_miss and k.startswith(may_miss + ".")))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (the architecture has {expected[k]})"
             for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    if not (missing or unexpected or wrong):
        return None
    return f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:3]}"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
                 config: dict[str, Any], may_miss: str | None = None) -> nn.Module:
    """Load `state` into `model` after checking that it fits: the one "do these weights fit this
    architecture" check of the project. Raises CheckpointError naming the file and the tensors."""
    problem = weights_mismatch(model, state, may_miss)
    if problem is not None:
        raise CheckpointError(f"{source}: the weights do not fit the architecture "
                              f"{config['architecture']} {config.get('model_args', {})} of "
                              f"config.json: {problem}")
    model.load_state_dict(state, strict=may_miss is None)
    return model


def is_published(folder: str | os.PathLike) -> bool:
    """A folder written by the publish stage (or downloaded from the Hub): one model.safetensors,
    no ema.safetensors, and the publish stage's SHA256SUMS or model card next to it."""
    folder = Path(folder)
    return ((folder / "model.safetensors").is_file() and not (folder / "ema.safetensors").exists()
            and ((folder / "SHA256SUMS").is_file() or (folder / "README.md").is_file()))


def model_weights(folder: str | os.PathLike, weights: str) -> tuple[Path, str, str | None]:
    """(file, label, message) of the `ema` / `raw` weights of a model folder.

    A published folder holds only the weights publish chose (EMA by default), so both `ema` and
    `raw` resolve to its model.safetensors, labelled `published`, with a message saying so.
    """
    folder = Path(folder)
    if is_published(folder):
        return (folder / "model.safetensors", "published",
                f"{folder} is a published folder: its model.safetensors are the published weights "
                f"(publish.weights chose EMA or raw); using them for weights={weights}")
    try:
        return weights_file(folder, weights), weights, None
    except CheckpointError as e:
        if weights == "ema" and (folder / "model.safetensors").is_file():
            raise CheckpointError(f"{folder} has no EMA weights (ema.safetensors: the run had "
                                  f"ema_decay null); use the raw ones (weights: raw)") from None
        raise CheckpointError(f"{e}; expected a model folder of the pretrain / finetune stage or "
                              f"a published folder") from None


def load_model_dir(folder: str | os.PathLike, weights: str = "ema",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load the model of a model folder (checked with `load_weights`)."""
    config = read_model_config(folder)
    path = weights_file(folder, weights)
    model = load_weights(build_from_config(config), load_file(str(path), device=str(device)), path,
                         config)
    return model.to(device).eval(), config


def default_crop_pct(test_res: int, crop_mode: str) -> float:
    """DeepMind's NFNet eval resizes to (S + 32)^2 ignoring aspect ("squash"), then crops S;
    batch-norm ResNets are evaluated the standard way: shorter side to S / 0.875, centre crop S."""
    return test_res / (test_res + 32) if crop_mode == "squash" else 0.875


def model_config(model: nn.Module, arch: str, model_args: dict, class_names: list[str],
                 train_res: int, test_res: int, crop_pct: float | None, interpolation: str,
                 extra: dict[str, Any], crop_mode: str = "squash") -> dict[str, Any]:
    """config.json in timm's hub format (so `timm.create_model('local-dir:...')` works).
    `crop_pct` None: the default of `crop_mode` (see default_crop_pct)."""
    crop_pct = crop_pct or default_crop_pct(test_res, crop_mode)
    timm_cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "architecture": arch,
        "model_args": std_conv.rebuild_args(arch, model_args),
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
