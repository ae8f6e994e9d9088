"""Fine-tuning initialisation: pretrained weights in, a new head sized to the target labels.

`--init` (the finetune stage) accepts
- a model folder written by our pretrain / finetune stage (`runs/pretrain/model`): EMA weights by
  default, raw ones with `finetune.init.weights=raw`;
- a folder written by our publish stage (config.json + model.safetensors, no ema.safetensors): its
  one set of weights is used whatever `init.weights` says (publish already chose EMA or raw);
- `timm:<architecture>=<weights.safetensors>`: any timm model with local weights (no download);
- `hf-hub:<org>/<name>`: a model on the Hugging Face Hub in timm's format, e.g. DeepMind's F0 as
  timm ships it, `hf-hub:timm/dm_nfnet_f0.dm_in1k`, through timm and huggingface_hub's download
  and cache (offline, HF_HUB_OFFLINE=1, from a filled cache);
- `dm:<F0_haiku.npz>`: DeepMind's own released checkpoint (pipeline/dm_checkpoint.py);
- `none:<variant>`: a randomly initialised variant, the from-scratch baseline.

The pretrained head is kept only when the target label set is the same (same class names, or the
same count where the checkpoint has no names); otherwise it is dropped and a new one is
initialised as the recipe says (zeros, as in DeepMind's fine-tuning code).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.checkpoint import fingerprint
from pipeline.dm_checkpoint import DeepMindCheckpointError, infer_variant, read_params, to_timm_state
from pipeline.files import sha256_file
from pipeline.model_config import ModelConfig, ModelError, Preprocessing
from pipeline.model_dir import build_from_config, load_weights, model_weights
from pipeline.recipe import FinetuneSection
from pipeline.variants import VARIANTS, build_model, set_stochastic_depth


@dataclass
class InitSource:
    """What fine-tuning starts from: a config (read from the init's config.json, or made here for
    the inits that have none), its weights, and a fingerprint that makes `--resume auto` refuse
    checkpoints of a run from other initial weights."""
    config: ModelConfig
    state: dict[str, torch.Tensor]
    fingerprint: str
    weights_label: str                      # ema | raw | published | <file> | scratch
    messages: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Where the weights come from
# ------------------------------------------------------------------------------------------------

def load_init(init: str, weights: str = "ema", seed: int = 0) -> InitSource:
    """The pretrained model named by `init` (see the module docstring for the forms)."""
    if init.startswith("none:"):
        return scratch_init(init[len("none:"):], seed)
    if init.startswith("timm:"):
        return timm_init(init)
    if init.startswith("hf-hub:"):
        return hub_init(init[len("hf-hub:"):])
    if init.startswith("dm:"):
        return deepmind_init(init[len("dm:"):])
    folder = Path(init)
    if not folder.is_dir():
        raise ModelError(
            f"'{init}' is not a folder. Give a model folder (runs/pretrain/model), a published "
            f"folder, timm:<architecture>=<weights.safetensors>, hf-hub:<org>/<name>, "
            f"dm:<F0_haiku.npz> or none:<variant>")
    config = ModelConfig.load(folder)
    path, label, message = model_weights(folder, weights)
    state = load_file(str(path))
    return InitSource(_with_num_classes(config, state), state,
                      fingerprint(str(folder), label, sha256_file(path)), label,
                      [message] if message else [])


def timm_init(init: str) -> InitSource:
    """`timm:<architecture>=<weights.safetensors>`: a timm model and a local state dict."""
    spec = init[len("timm:"):]
    if "=" not in spec:
        raise ModelError("write timm:<architecture>=<weights.safetensors> (no download "
                         "happens: the weights must be a local file)")
    arch, path = spec.split("=", 1)
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('.')[0][:12]}*")[:8]
        raise ModelError(f"timm has no architecture '{arch}'"
                         + (f"; similar: {', '.join(near)}" if near else ""))
    if not Path(path).is_file():
        raise ModelError(f"weights file {path} not found")
    if not path.endswith(".safetensors"):
        raise ModelError(f"{path}: only .safetensors weights are read (no pickle); "
                         f"convert with safetensors.torch.save_file(model.state_dict(), ...)")
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    config = ModelConfig(architecture=arch, num_classes=model.num_classes,
                         pretrained_cfg=_timm_preprocessing(model, f"timm:{arch}"),
                         lineage={"variant": arch})
    state = load_file(path)
    return InitSource(_with_num_classes(config, state), state, fingerprint(arch, sha256_file(path)),
                      Path(path).name)


def _timm_preprocessing(model: nn.Module, source: str) -> Preprocessing:
    """A timm model's own pretrained_cfg (its plain values) as this project reads one."""
    pc = {k: v for k, v in model.pretrained_cfg.items()
          if isinstance(v, (str, int, float, tuple, list))}
    return Preprocessing.from_dict(pc, f"{source}: pretrained_cfg")


def hub_init(repo: str) -> InitSource:
    """A timm model from the Hugging Face Hub (`org/name`), through timm (architecture, weights)
    and huggingface_hub (download, cache; HF_HUB_OFFLINE=1 reads the cache only)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        config_file = Path(hf_hub_download(repo, "config.json"))
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(f"hf-hub:{repo}", pretrained=True)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
        why = (f"it is not in the Hugging Face cache {HF_HUB_CACHE}" +
               (" (HF_HUB_OFFLINE=1: the Hub is not asked)" if HF_HUB_OFFLINE else
                " and the Hub did not give it"))
        raise ModelError(
            f"hf-hub:{repo}: {why} ({type(e).__name__}). Download it once where the Hub can be "
            f"reached (`hf download {repo}`), or set HF_HUB_CACHE to a cache that holds it") from None
    hub_cfg = ModelConfig.load(config_file)
    # the preprocessing timm resolved for the model (its config.json over the architecture's)
    config = dataclasses.replace(hub_cfg, num_classes=model.num_classes,
                                 pretrained_cfg=_timm_preprocessing(model, f"hf-hub:{repo}"),
                                 lineage={"variant": hub_cfg.architecture, "hub": repo})
    revision = config_file.parent.name                  # the snapshot's commit hash
    return InitSource(config, model.state_dict(), fingerprint("hf-hub", repo, revision),
                      f"hf-hub:{repo}@{revision[:12]}",
                      [f"from the Hugging Face Hub: {repo} (revision {revision[:12]}, cached "
                       f"at {config_file.parent})"])


def deepmind_init(path: str) -> InitSource:
    """DeepMind's released haiku checkpoint (F0..F6), in our layout, as the variant it is."""
    try:
        params = read_params(path)
        variant = infer_variant(params)
        v = VARIANTS[variant]
        state = to_timm_state(params, v.depths)
    except DeepMindCheckpointError as e:
        raise ModelError(f"dm:{path}: {e}") from None
    num_classes = int(state["head.fc.weight"].shape[0])
    # whether the parameters fit is checked where they are loaded (model_dir.load_weights)
    config = ModelConfig(
        architecture=v.timm_arch, num_classes=num_classes, model_args=v.model_args(),
        pretrained_cfg=Preprocessing(input_size=(3, v.train_res, v.train_res),
                                     test_input_size=(3, v.test_res, v.test_res),
                                     crop_mode=v.crop_mode, crop_pct=v.crop_pct),
        lineage={"variant": variant, "deepmind_checkpoint": str(path)})
    return InitSource(config, state, fingerprint("dm", sha256_file(path)), Path(path).name,
                      [f"DeepMind checkpoint {path}: NFNet-{variant.upper()}, {num_classes} "
                       f"classes, {sum(t.numel() for t in state.values()):,} parameters"])


def scratch_init(variant: str, seed: int = 0) -> InitSource:
    """A randomly initialised variant, as if it were a pretrained checkpoint: the from-scratch
    baseline that fine-tuning is compared against (same budget, same new head)."""
    model, arch, model_args = build_model(variant, num_classes=1, seed=seed)
    # no training resolution to record; evaluated the variant's way (NFNets: squash)
    config = ModelConfig(architecture=arch, num_classes=1, model_args=model_args,
                         pretrained_cfg=Preprocessing(crop_mode=VARIANTS[variant].crop_mode),
                         lineage={"variant": variant, "from_scratch": True})
    return InitSource(config, model.state_dict(), fingerprint("scratch", variant, seed),
                      "scratch", [f"from scratch: {variant} with random weights (seed {seed})"])


def _with_num_classes(config: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """The class count of the weights themselves (a timm default of 1000 may not be what was
    saved): read from the classifier weight the config names."""
    name = config.pretrained_cfg.classifier
    if isinstance(name, str) and f"{name}.weight" in state:
        return dataclasses.replace(config, num_classes=int(state[f"{name}.weight"].shape[0]))
    return config


# ------------------------------------------------------------------------------------------------
# The fine-tuning model
# ------------------------------------------------------------------------------------------------

def build_finetune_model(src: InitSource, class_names: list[str], section: FinetuneSection
                         ) -> tuple[nn.Module, list[str]]:
    """The pretrained network with the recipe's dropout / stochastic depth, its head kept or
    replaced (see the module docstring), and the recipe's frozen modules. Returns (model, messages).
    """
    config, state = src.config, dict(src.state)
    messages = list(src.messages)
    num_classes = len(class_names)
    rate = section.model.drop_path_rate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)        # the same model on every process and run
        model = build_from_config(config, num_classes=num_classes,
                                  drop_rate=section.model.drop_rate)
        if rate and not any(hasattr(m, "skipinit_gain") for m in model.modules()):
            # not an NFNet: timm's own stochastic depth (rescaled, ramped to the full rate)
            torch.manual_seed(section.seed)
            model = build_from_config(config, num_classes=num_classes,
                                      drop_rate=section.model.drop_rate, drop_path_rate=rate)
            messages.append(f"{config.architecture} is not an NFNet: drop_path_rate {rate} "
                            f"is timm's stochastic depth for it")
        else:
            set_stochastic_depth(model, rate)
    head_prefix = head_name(model)
    head_keys = {k for k in state if k.startswith(head_prefix + ".")}
    old_names = list(config.label_names)
    if config.from_scratch:
        why = "training from scratch"
    elif old_names and old_names != list(class_names):
        why = (f"the pretrained classes {_short(old_names)} differ from the target's "
               f"{_short(class_names)}")
    elif config.num_classes != num_classes:
        why = f"{config.num_classes} pretrained classes -> {num_classes} target classes"
    elif not head_keys:
        why = "the pretrained weights have no classifier"
    else:
        why = None
    if why is not None:
        state = {k: v for k, v in state.items() if k not in head_keys}
        init_head(model, section.init.head_init)
        messages.append(f"new head ({head_prefix}, {num_classes} classes): {why}; "
                        f"{'the old head is dropped, ' if head_keys else ''}"
                        f"the new one is initialised with {section.init.head_init}")
    else:
        messages.append(f"head kept ({head_prefix}): the target has the same {num_classes} classes"
                        + (f" {_short(old_names)}" if old_names else " (no class names to compare)"))
    load_weights(model, state, src.weights_label, config, may_miss=head_prefix)
    frozen = freeze(model, section.init.freeze)
    if frozen:
        messages.append(f"frozen: {frozen:,} parameters under {', '.join(section.init.freeze)} "
                        f"(not trained, not decayed)")
    return model, messages


def head_name(model: nn.Module) -> str:
    """The module path of the classifier (`head.fc` for NFNets, `fc`, `classifier`, ...)."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ModelError(f"{type(model).__name__}: cannot locate its classifier module")


def init_head(model: nn.Module, how: str) -> None:
    """Zeros (DeepMind's fine-tuning) or N(0, 0.01) weights; zero bias."""
    head = model.get_classifier()
    with torch.no_grad():
        if getattr(head, "weight", None) is not None:
            if how == "zeros":
                nn.init.zeros_(head.weight)
            else:
                nn.init.normal_(head.weight, 0.0, 0.01)
        if getattr(head, "bias", None) is not None:
            nn.init.zeros_(head.bias)


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Stop gradients for parameters whose names start with any prefix; returns their count.
    Frozen parameters get no gradient, so SGD, weight decay and AGC leave them untouched."""
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    under = lambda n, p: n == p or n.startswith(p + ".")  # noqa: E731
    for p in prefixes:
        if not any(under(n, p) for n in names):
            raise ValueError(f"finetune.init.freeze: no parameters under '{p}'; this model's "
                             f"modules are {', '.join(_module_prefixes(names))}")
    count = 0
    for n, param in model.named_parameters():
        if any(under(n, p) for p in prefixes):
            param.requires_grad_(False)
            count += param.numel()
    return count


def _module_prefixes(names: list[str]) -> list[str]:
    """`stem`, `stages.0`, ..., `head.fc`: the prefixes a freeze list can name."""
    out: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        out[".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]] = None
    return list(out)


def _short(names: list[str], k: int = 5) -> str:
    return "[" + ", ".join(names[:k]) + (", ..." if len(names) > k else "") + "]"


def resolution_note(init_config: ModelConfig, section: FinetuneSection) -> str | None:
    """What fine-tuning does to the resolution, for the log (None when the init does not say
    what it was trained at)."""
    before = init_config.pretrained_cfg.train_res
    if before is None:
        return None
    return (f"resolution: pretrained at {before} px -> fine-tuning at {section.train_res} px, "
            f"testing at {section.test_res} px"
            + ("" if section.train_res > before else
               " (not above the pretraining resolution: the paper's transfer raises it)"))


def finetune_lineage(init_config: ModelConfig, init: str, weights_label: str,
                     recipe_name: str) -> dict[str, Any]:
    """The `nfnet_pipeline` block of the fine-tuned model's config.json: the init's lineage (its
    variant, width, data) plus where fine-tuning started from. The init's own step, stage and
    fingerprint are dropped: the engine writes the fine-tuning run's."""
    lineage = {**init_config.lineage, "init": init,
               "init_weights": weights_label, "recipe": recipe_name}
    for k in ("step", "stage", "fingerprint"):
        lineage.pop(k, None)
    before = init_config.pretrained_cfg.train_res
    if before is not None:
        lineage["init_res"] = before
    return lineage
