"""Training checkpoints: the atomic, resumable state of a run (for exact resume).

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

What a stage hands to the next (`<stage out>/model/`: weights and config.json) is a model folder,
not a checkpoint: pipeline/model_dir.py, and pipeline/model_config.py for config.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.files import atomic_dir
from pipeline.model_dir import tensor_bytes, weights_bytes, write_weights

STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be resumed from; the message names the folder."""


def fingerprint(*parts: Any) -> str:
    """A short hash of `parts` (as JSON): the identity of a run's settings, or of its initial
    weights (pipeline/resume.py, pipeline/transfer.py)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module,
                    ema: nn.Module | None, train_state: dict[str, Any],
                    meta: dict[str, Any], keep: int, logs: Path | None = None) -> Path:
    """Write `root/step-<step>` atomically (with a copy of the folder `logs`, if it exists),
    then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    with atomic_dir(final, what=f"the checkpoint of step {step}",
                    needs=weights_bytes(model, ema) + tensor_bytes(train_state)) as tmp:
        write_weights(tmp, model, ema)
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
