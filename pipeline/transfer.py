"""Fine-tuning initialisation: pretrained weights in, a new head sized to the target labels.

`--init` accepts
- a model folder written by our pretrain / finetune stage (`runs/pretrain/model`): EMA weights by
  default (`finetune.init.weights: raw` for the raw ones);
- a folder written by our publish stage (config.json + model.safetensors);
- `timm:<architecture>=<weights.safetensors>`: any timm model with local weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.data.manifest import sha256_file
from pipeline.recipe import FinetuneSection
from pipeline.variants import set_stochastic_depth


def load_init(init: str, weights: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config, state_dict, fingerprint) of the pretrained model named by `init`."""
    if init.startswith("timm:"):
        spec = init[len("timm:"):]
        if "=" not in spec:
            raise ckpt.CheckpointError(f"--init {init}: write timm:<architecture>=<weights.safetensors>"
                                       f" (no download happens: the weights must be local)")
        arch, path = spec.split("=", 1)
        if not Path(path).is_file():
            raise ckpt.CheckpointError(f"--init {init}: weights file {path} not found")
        model = timm.create_model(arch, pretrained=False)
        config = {"architecture": arch, "model_args": {}, "num_classes": model.num_classes,
                  "label_names": [], "pretrained_cfg": dict(model.pretrained_cfg),
                  "nfnet_pipeline": {"variant": arch}}
        return config, load_file(path), ckpt.fingerprint(arch, sha256_file(path))
    folder = Path(init)
    config = ckpt.read_model_config(folder)
    path = ckpt.weights_file(folder, weights)
    return config, load_file(str(path)), ckpt.fingerprint(str(folder), weights, sha256_file(path))


def build_finetune_model(config: dict[str, Any], state: dict[str, torch.Tensor],
                         class_names: list[str], section: FinetuneSection) -> tuple[nn.Module, list[str]]:
    """The pretrained network with the recipe's dropout / stochastic depth and, when the label set
    differs, a new head initialised as the recipe says. Returns (model, messages).

    The label sets differ when both have class names and the names differ, or else when the
    counts differ; only then is the pretrained head dropped.
    """
    messages = []
    num_classes = len(class_names)
    old_names = list(config.get("label_names") or [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)        # the same new head on every process and run
        model = ckpt.build_from_config(config, num_classes=num_classes,
                                       drop_rate=section.model.drop_rate)
    set_stochastic_depth(model, section.model.drop_path_rate)
    head = model.get_classifier()
    head_keys = {k for k in state if _is_head_key(model, k)}
    same = (old_names == list(class_names)) if old_names else config["num_classes"] == num_classes
    if not same:
        state = {k: v for k, v in state.items() if k not in head_keys}
        why = (f"{config['num_classes']} pretrained classes -> {num_classes} target classes"
               if config["num_classes"] != num_classes else
               f"pretrained classes {old_names[:5]} differ from the target's {class_names[:5]}")
        messages.append(f"new head: {why}; the old head is dropped, the new one initialised "
                        f"with {section.init.head_init}")
        with torch.no_grad():
            if section.init.head_init == "zeros":
                nn.init.zeros_(head.weight)
            else:
                nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
    else:
        messages.append(f"head kept: the target has the same {num_classes} classes")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"pretrained weights do not fit {config['architecture']}: "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    frozen = freeze(model, section.init.freeze)
    if frozen:
        messages.append(f"frozen: {frozen} parameters under {section.init.freeze}")
    return model, messages


def _is_head_key(model: nn.Module, key: str) -> bool:
    head_name = model.pretrained_cfg.get("classifier", "head.fc") if hasattr(model, "pretrained_cfg") else "head.fc"
    return key.startswith(head_name + ".")


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Stop gradients for parameters whose names start with any prefix; returns their count."""
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(n.startswith(p + ".") or n == p for n in names):
            raise ValueError(f"finetune.init.freeze: no parameters under '{p}'; top-level modules "
                             f"are {sorted({n.split('.')[0] for n in names})}")
    count = 0
    for n, param in model.named_parameters():
        if any(n.startswith(p + ".") or n == p for p in prefixes):
            param.requires_grad_(False)
            count += param.numel()
    return count


def scratch_init(variant: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """A randomly initialised variant, as if it were a pretrained checkpoint (the from-scratch
    baseline that fine-tuning is compared against)."""
    from pipeline.variants import build_model
    model, arch, model_args = build_model(variant, num_classes=1, seed=seed)
    config = {"architecture": arch, "model_args": model_args, "num_classes": 1, "label_names": [],
              "pretrained_cfg": {}, "nfnet_pipeline": {"variant": variant, "from_scratch": True}}
    return config, model.state_dict(), ckpt.fingerprint("scratch", variant)
