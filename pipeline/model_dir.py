"""Model folders: the weights and config.json one stage hands to the next.

A training stage writes `<out>/model/`:
    model.safetensors    the raw weights
    ema.safetensors      the EMA weights (when the recipe keeps an EMA)
    config.json          what the network is and how to test it (pipeline/model_config.py)
The publish stage writes a folder with one model.safetensors (the weights it chose), config.json,
a model card and SHA256SUMS; evaluate and finetune accept either (`model_weights`). The network is
rebuilt from config.json with timm (`build_from_config`) and the weights are checked to fit it
before they are loaded (`load_weights`), so a wrong file is an error naming it and the tensors,
never a silently half-loaded model. Weights are safetensors only: no pickle is ever loaded.

The resumable training state (optimizer, data cursor, step) is not here: pipeline/checkpoint.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import std_conv
from pipeline.files import atomic_dir
from pipeline.model_config import ModelConfig, ModelError


def _state_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: contiguous CPU copies (it refuses shared or
    non-contiguous storage)."""
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


def weights_bytes(model: nn.Module, ema: nn.Module | None) -> int:
    """What `write_weights` writes, less headers."""
    return tensor_bytes([m.state_dict() for m in (model, ema) if m is not None])


def write_weights(folder: Path, model: nn.Module, ema: nn.Module | None) -> None:
    """model.safetensors (and ema.safetensors) into `folder`, one CPU copy at a time: the weights
    of a model folder and of a training checkpoint (pipeline/checkpoint.py)."""
    save_file(_state_for_save(model), str(folder / "model.safetensors"))
    if ema is not None:
        save_file(_state_for_save(ema), str(folder / "ema.safetensors"))


def save_model_dir(out: str | os.PathLike, model: nn.Module, ema: nn.Module | None,
                   config: ModelConfig) -> Path:
    """Write weights and config.json into `out`, replacing the folder as a whole (files.atomic_dir:
    a crash or a full disk leaves the previous folder as it was)."""
    with atomic_dir(out, what="the model folder", needs=weights_bytes(model, ema)) as tmp:
        write_weights(tmp, model, ema)
        config.save(tmp)
    return Path(out)


def weights_file(folder: str | os.PathLike, weights: str) -> Path:
    """`ema` or `raw` weights of a model folder (a published folder has only model.safetensors)."""
    folder = Path(folder)
    path = folder / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    if not path.is_file():
        if weights == "ema" and (folder / "model.safetensors").is_file():
            raise ModelError(f"{folder} has no EMA weights (ema.safetensors: the run had "
                             f"ema_decay null); use the raw ones (weights: raw)")
        raise ModelError(f"{path} not found; expected a model folder of the pretrain / finetune "
                         f"stage or a published folder")
    return path


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
    return weights_file(folder, weights), weights, None


def build_from_config(config: ModelConfig, num_classes: int | None = None,
                      **kwargs: Any) -> nn.Module:
    """The timm model a config.json describes (architecture + model_args), untrained. A DeepMind
    NFNet gets timm's closest weight standardisation (std_conv_eps 1e-10) when its model_args do
    not set one (timm's and the Hub's dm_nfnet configs, and this project's before it wrote it),
    as its exported config.json will say."""
    arch = config.architecture
    return timm.create_model(arch, pretrained=False,
                             num_classes=config.num_classes if num_classes is None else num_classes,
                             **std_conv.rebuild_args(arch, config.model_args), **kwargs)


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
                 config: ModelConfig, may_miss: str | None = None) -> nn.Module:
    """Load `state` into `model` after checking that it fits: the one "do these weights fit this
    architecture" check of the project. Raises ModelError naming the file and the tensors."""
    problem = weights_mismatch(model, state, may_miss)
    if problem is not None:
        raise ModelError(f"{source}: the weights do not fit the architecture "
                         f"{config.architecture} {config.model_args} of config.json: {problem}")
    model.load_state_dict(state, strict=may_miss is None)
    return model


def load_model_dir(folder: str | os.PathLike, weights: str = "ema",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Rebuild and load the model of a model folder (checked with `load_weights`)."""
    config = ModelConfig.load(folder)
    path = weights_file(folder, weights)
    model = load_weights(build_from_config(config), load_file(str(path), device=str(device)), path,
                         config)
    return model.to(device).eval(), config
