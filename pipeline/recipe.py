"""Typed, strict recipe schema: load YAML, apply dotted overrides, write the resolved recipe.

A recipe is one YAML file with a section per stage (`shard`, `pretrain`, `finetune`, `evaluate`,
`publish`), so DVC can track each stage's own section. Every key is declared below with its type;
an unknown key, a missing key or a wrong type fails at once with the file, the dotted key and what
is allowed. Derived values (lr from the batch, steps from epochs) are computed by the code that uses
them and written next to the outputs by `write_resolved`, never hand-copied between files.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class RecipeError(ValueError):
    """A recipe file or override is wrong; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------------------------
# Schema. Fields without a default must be written in every recipe ("every number pinned").
# --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ShardSection:
    shard_size: int                       # samples per tar shard
    max_size: Optional[int]               # shorter side is resized down to this (px); null keeps size
    jpeg_quality: int                     # re-encode quality for resized / converted images
    seed: int                             # seeds the permutation of samples across shards
    splits: list[str]                     # split folders (or dataset splits) to shard, e.g. [train, val]
    max_skipped_fraction: float = 0.001   # fail if more unreadable images than this are skipped
    class_list: Optional[str] = None      # file with one class name per line; default: sorted folders
    label_file: Optional[str] = None      # labels of a flat split folder (ImageNet val as shipped):
                                          # LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt
    image_column: str = "image"           # Hugging Face datasets sources
    label_column: str = "label"
    workers: int = 0                      # processes; 0 = all cores


@dataclass(kw_only=True)
class ModelSection:
    variant: str                          # a key of pipeline.variants.VARIANTS
    drop_rate: float                      # dropout before the classifier
    drop_path_rate: float                 # stochastic depth, ramped linearly over blocks
    width: float = 1.0                    # DeepMind's width multiplier on the block widths
    sync_bn: bool = False                 # BN baselines: batch statistics across GPUs


@dataclass(kw_only=True)
class FinetuneModelSection:
    drop_rate: float
    drop_path_rate: float
    sync_bn: bool = False
    bn_stats: Literal["train", "freeze"] = "train"   # BN baselines: update or freeze BN statistics


@dataclass(kw_only=True)
class AugmentSection:
    crop_scale: list[float]               # RandomResizedCrop area range, e.g. [0.08, 1.0]
    hflip: bool
    randaugment_layers: int               # 0 = no RandAugment
    randaugment_magnitude: int            # DeepMind's levels: 5, 10 or 15 (timm's cap is raised)
    mixup_alpha: float                    # 0 = off; MixUp on one half of each batch ...
    cutmix_alpha: float                   # ... and CutMix on the other half (DeepMind)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"


@dataclass(kw_only=True)
class LoaderSection:
    num_workers: int                      # dataloader worker processes per device
    shuffle_block: int                    # samples shuffled together within the epoch stream
    decode: Literal["cpu", "device"] = "cpu"   # device: nvJPEG decode + augmentation on the GPU


@dataclass(kw_only=True)
class TrainSection:
    train_res: int                        # training resolution (px)
    test_res: int                         # evaluation resolution of the trained model (px)
    crop_pct: Optional[float] = None      # eval centre-crop fraction; null: S / (S + 32), DeepMind's
    expected_samples: Optional[int] = None  # dataset size for --dry-run without shards
    epochs: Optional[float] = None        # give epochs or steps (optimizer steps), not both
    steps: Optional[int] = None
    warmup_epochs: Optional[float] = None
    warmup_steps: Optional[int] = None
    global_batch: int                     # samples per optimizer step, all devices together
    micro_batch: int                      # most samples per device per forward pass (memory);
                                          # fewer when global_batch / processes is smaller
    lr_base: float
    lr_batch_scaling: bool                # lr = lr_base * global_batch / 256 when true
    momentum: float
    nesterov: bool
    weight_decay: float                   # on conv/linear weights only, never gains or biases
    clip_factor: Optional[float]          # AGC lambda; null = no clipping
    agc_eps: float = 1e-3
    label_smoothing: float
    ema_decay: Optional[float]            # max EMA decay; null = no EMA
    sam_rho: Optional[float] = None       # Sharpness-Aware Minimisation radius; null = off
    augment: AugmentSection
    loader: LoaderSection
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    seed: int
    log_every: int = 10                   # optimizer steps between log lines / tracker points
    checkpoint_every: int = 0             # optimizer steps between checkpoints; 0 = only at the end
    eval_every: int = 0                   # optimizer steps between val top-1 points; 0 = only at the end
    keep_checkpoints: int = 2
    nan_policy: Literal["stop", "skip"] = "stop"
    trackers: list[Literal["dvclive", "tensorboard"]] = field(default_factory=lambda: ["dvclive"])

    def check(self, where: str) -> None:
        _exactly_one(self, where, "epochs", "steps")
        _exactly_one(self, where, "warmup_epochs", "warmup_steps")
        if self.global_batch % self.micro_batch:
            raise RecipeError(f"{where}.global_batch ({self.global_batch}) must be a multiple of "
                              f"{where}.micro_batch ({self.micro_batch})")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise RecipeError(f"{where}: global_batch and micro_batch must be positive")


@dataclass(kw_only=True)
class PretrainSection(TrainSection):
    model: ModelSection


@dataclass(kw_only=True)
class InitSection:
    weights: Literal["ema", "raw"] = "ema"          # which pretrained weights to start from
    head_init: Literal["zeros", "normal"] = "zeros"  # new head: zeros as in DeepMind's fine-tuning
    freeze: list[str] = field(default_factory=list)  # module prefixes to freeze, e.g. [stem, stages.0]


@dataclass(kw_only=True)
class FinetuneSection(TrainSection):
    model: FinetuneModelSection
    init: InitSection


@dataclass(kw_only=True)
class EvaluateSection:
    batch: int
    num_workers: int
    weights: list[Literal["ema", "raw"]]    # evaluated when present in the checkpoint
    test_res: Optional[int] = None         # null: the checkpoint's test resolution
    crop_pct: Optional[float] = None       # null: the checkpoint's crop fraction
    interpolation: Optional[str] = None    # null: the checkpoint's interpolation
    calibration_bins: int = 15


@dataclass(kw_only=True)
class PublishSection:
    model_name: str
    license: str
    tags: list[str]
    datasets: list[str]
    weights: Literal["ema", "raw"] = "ema"
    repo: Optional[str] = None            # org/name on the Hub; null = local folder only
    private: bool = False
    revision: Optional[str] = None
    commit_message: Optional[str] = None
    require_metrics: bool = True


@dataclass(kw_only=True)
class Recipe:
    name: str
    description: str
    shard: ShardSection
    pretrain: PretrainSection
    finetune: FinetuneSection
    evaluate: EvaluateSection
    publish: PublishSection
    source: str = field(default="", metadata={"internal": True})  # file it was loaded from

    def check(self) -> None:
        self.pretrain.check("pretrain")
        self.finetune.check("finetune")


def _exactly_one(obj: Any, where: str, a: str, b: str) -> None:
    if (getattr(obj, a) is None) == (getattr(obj, b) is None):
        raise RecipeError(f"{where}: give exactly one of '{a}' and '{b}' (the other null or absent)")


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, which reads `2e-5` (no dot) as a string; accept such numbers for floats.
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{src}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, src)
            except RecipeError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, src)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _build(cls: type, data: dict, where: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in declared:
            allowed = ", ".join(sorted(declared))
            raise RecipeError(f"{src}: unknown key '{prefix}{key}'. Allowed keys in "
                              f"'{where or 'the top level'}': {allowed}")
    kwargs = {}
    for name, f in declared.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{src}: missing key '{prefix}{name}' ({_type_name(hints[name])}); "
                              f"every recipe must set it")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`pretrain.epochs=3` -> (['pretrain', 'epochs'], 3); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise RecipeError(f"override '{text}': empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override '{text}': value is not valid YAML ({e})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str], src: str) -> dict:
    """Set dotted keys in the raw recipe mapping; validation afterwards names any bad key."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node:
                    raise RecipeError(f"override '{text}': '{'.'.join(path[:i + 1])}' is not a section")
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file. Raises RecipeError naming file and key."""
    path = Path(path)
    if not path.is_file():
        avail = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = f" Recipes in {path.parent}: {', '.join(avail)}" if avail else ""
        raise RecipeError(f"recipe file not found: {path}.{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    src = str(path)
    if overrides:
        data = apply_overrides(data, overrides, src)
        src = f"{path} (with overrides {' '.join(overrides)})"
    recipe = _build(Recipe, data, "", src)
    try:
        recipe.check()
    except RecipeError as e:
        raise RecipeError(f"{src}: {e}") from None
    recipe.source = str(path)
    return recipe


def to_dict(obj: Any) -> Any:
    """A section (or the whole recipe) as plain data, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolved_text(recipe: Recipe, section: str, resolved: dict | None = None,
                  overrides: list[str] | None = None) -> str:
    """The stage's section as used, plus derived values, as YAML."""
    doc = {
        "recipe": recipe.source,
        "name": recipe.name,
        "overrides": list(overrides or []),
        section: to_dict(getattr(recipe, section)),
    }
    if resolved:
        doc["resolved"] = resolved
    return yaml.safe_dump(doc, sort_keys=False)


def write_resolved(recipe: Recipe, section: str, out_dir: str | os.PathLike,
                   resolved: dict | None = None, overrides: list[str] | None = None) -> Path:
    """Write `<out_dir>/recipe.resolved.yaml` (see `resolved_text`)."""
    out = Path(out_dir) / "recipe.resolved.yaml"
    atomic_write_text(out, resolved_text(recipe, section, resolved, overrides))
    return out
