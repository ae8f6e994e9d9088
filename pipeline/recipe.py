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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.files import atomic_write_text


class RecipeError(ValueError):
    """A recipe file or override is wrong; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------------------------
# Allowed values. A numeric key declares its range with `bounds(...)`; `_build` checks it right
# after the type, so a bad value stops the stage before any work, in the type errors' style.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False           # True: lo itself is not allowed
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}"
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {num(self.hi)}"     # type: ignore[arg-type]


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A schema field whose value (every item, for a list) must lie in the given range."""
    rng = Range(gt if gt is not None else ge, lt if lt is not None else le,
                lo_open=gt is not None, hi_open=lt is not None)
    return field(default=default, metadata={"range": rng})


# --------------------------------------------------------------------------------------------
# Schema. Fields without a default must be written in every recipe ("every number pinned").
# A section's `check(where)` runs after its keys are read: rules that involve several keys.
# --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ShardSection:
    shard_size: int = bounds(ge=1)        # samples per tar shard
    max_size: int | None = bounds(ge=1)  # shorter side is resized down to this (px); null keeps size
    jpeg_quality: int = bounds(ge=1, le=100)  # re-encode quality for resized / converted images
    seed: int = bounds(ge=0)              # seeds the permutation of samples across shards
    splits: list[str]                     # split folders (or dataset splits) to shard, e.g. [train, val]
    max_skipped_fraction: float = bounds(ge=0, le=1, default=0.001)  # fail if more unreadable
                                          # images than this fraction, and than
    max_skipped_files: int = bounds(ge=0, default=10)  # this many, are skipped: strict at ImageNet
                                          # scale (0.1% = 1,281), a few bad files in a small folder
    class_list: str | None = None      # file with one class name per line; default: sorted folders
    label_file: str | None = None      # labels of a flat split folder (ImageNet val as shipped):
                                          # LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt
    image_column: str = "image"           # Hugging Face datasets sources
    label_column: str = "label"
    workers: int = bounds(ge=0, default=0)  # processes; 0 = all cores

    def check(self, where: str) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise RecipeError(f"'{where}.splits' must name distinct splits, got {self.splits!r}")
        bad = [s for s in self.splits if not s or not s.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise RecipeError(f"'{where}.splits': {bad!r} must be letters, digits, '_' or '-' "
                              f"(they name files)")


@dataclass(kw_only=True)
class TrainModelSection:
    """The model keys every training stage has."""
    drop_rate: float = bounds(ge=0, lt=1)       # dropout before the classifier
    drop_path_rate: float = bounds(ge=0, lt=1)  # stochastic depth, ramped linearly over blocks
    sync_bn: bool = False                 # BN baselines: batch statistics across GPUs


@dataclass(kw_only=True)
class ModelSection(TrainModelSection):
    """pretrain.model: which network to build."""
    variant: str                          # a key of pipeline.variants.VARIANTS
    width: float = bounds(gt=0, default=1.0)  # DeepMind's width multiplier on the block widths


@dataclass(kw_only=True)
class FinetuneModelSection(TrainModelSection):
    bn_stats: Literal["train", "freeze"] = "train"   # BN baselines: update or freeze BN statistics


@dataclass(kw_only=True)
class AugmentSection:
    crop_scale: list[float] = bounds(gt=0, le=1)  # RandomResizedCrop area range, e.g. [0.08, 1.0]
    hflip: bool
    randaugment_layers: int = bounds(ge=0)        # 0 = no RandAugment
    randaugment_magnitude: int = bounds(ge=0, le=30)  # DeepMind's levels: 5, 10 or 15
    mixup_alpha: float = bounds(ge=0)     # 0 = off; MixUp on one half of the examples ...
    cutmix_alpha: float = bounds(ge=0)    # ... and CutMix on the other half (DeepMind)
    mix_pairs: Literal["disjoint", "in_batch"]   # disjoint: 2 images per example (DeepMind);
                                          # in_batch: each image mixed with another of the batch
    randaugment_order: Literal["before_mix", "after_mix"]   # where RandAugment runs (DeepMind:
                                          # after mixing, on the mixed example)
    randaugment_ops: Literal["deepmind", "timm"] = "deepmind"   # DeepMind's 16 operations and
                                          # magnitudes, or timm's rand-m*-n* (CPU decode only)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"

    def check(self, where: str) -> None:
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            raise RecipeError(f"'{where}.crop_scale' must be [min, max] with 0 < min <= max <= 1 "
                              f"(fractions of the image area), got {self.crop_scale!r}")


@dataclass(kw_only=True)
class LoaderSection:
    num_workers: int = bounds(ge=0)       # dataloader worker processes per device
    shuffle_block: int = bounds(ge=1)     # samples shuffled together within the epoch stream
    decode: Literal["cpu", "device"] = "cpu"   # device: nvJPEG decode + augmentation on the GPU
    bad_samples: Literal["stop", "skip"] = "stop"  # a sample that cannot be read: stop the run,
                                          # or replace it (by one of its batch) and count it
    max_bad_samples: int = bounds(ge=0, default=100)  # skip: stop when more than this many


@dataclass(kw_only=True)
class TrainSection:
    """The keys pretrain and finetune share (the training engine reads only these)."""
    model: TrainModelSection
    train_res: int = bounds(ge=16)        # training resolution (px)
    test_res: int = bounds(ge=16)         # evaluation resolution of the trained model (px)
    crop_pct: float | None = bounds(gt=0, le=1, default=None)  # eval centre-crop fraction;
                                          # null: S / (S + 32), DeepMind's
    expected_samples: int | None = bounds(ge=1, default=None)  # dataset size for --dry-run
    epochs: float | None = bounds(gt=0, default=None)  # give epochs or steps (optimizer steps)
    steps: int | None = bounds(ge=1, default=None)
    warmup_epochs: float | None = bounds(ge=0, default=None)
    warmup_steps: int | None = bounds(ge=0, default=None)
    global_batch: int = bounds(ge=1)      # samples per optimizer step, all devices together
    micro_batch: int = bounds(ge=1)       # most samples per device per forward pass (memory);
                                          # fewer when global_batch / processes is smaller
    lr_base: float = bounds(ge=0)          # 0 leaves the weights as they are (checks)
    lr_batch_scaling: bool                # lr = lr_base * global_batch / 256 when true
    momentum: float = bounds(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = bounds(ge=0)    # on conv/linear weights only, never gains or biases
    clip_factor: float | None = bounds(gt=0)  # AGC lambda; null = no clipping
    agc_eps: float = bounds(gt=0, default=1e-3)
    label_smoothing: float = bounds(ge=0, lt=1)
    ema_decay: float | None = bounds(gt=0, lt=1)  # max EMA decay; null = no EMA
    sam_rho: float | None = bounds(gt=0, default=None)  # SAM radius; null = off
    augment: AugmentSection
    loader: LoaderSection
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True
    compile: bool = False                 # torch.compile the model for training and evaluation
    seed: int = bounds(ge=0)
    log_every: int = bounds(ge=1, default=10)  # optimizer steps between log lines / tracker points
    checkpoint_every: int = bounds(ge=0, default=0)  # steps between checkpoints; 0 = only at the end
    eval_every: int = bounds(ge=0, default=0)  # steps between val top-1 points; 0 = only at the end
    keep_checkpoints: int = bounds(ge=0, default=2)  # newest checkpoints kept; 0 = all
    nan_policy: Literal["stop", "skip"] = "stop"
    trackers: list[Literal["dvclive", "tensorboard"]] = field(default_factory=lambda: ["dvclive"])

    def check(self, where: str) -> None:
        _exactly_one(self, where, "epochs", "steps")
        _exactly_one(self, where, "warmup_epochs", "warmup_steps")
        if self.global_batch % self.micro_batch:
            raise RecipeError(f"'{where}.global_batch' ({self.global_batch}) must be a multiple of "
                              f"'{where}.micro_batch' ({self.micro_batch})")
        aug = self.augment
        if self.loader.decode == "device" and aug.randaugment_ops == "timm" and aug.randaugment_layers:
            raise RecipeError(f"'{where}.augment.randaugment_ops: timm' runs on the CPU path only; "
                              f"use '{where}.loader.decode: cpu', or randaugment_ops: deepmind")

    @property
    def freeze_bn_stats(self) -> bool:
        """BN layers keep their running statistics (only fine-tuning can ask for it)."""
        return False


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

    @property
    def freeze_bn_stats(self) -> bool:
        return self.model.bn_stats == "freeze"


@dataclass(kw_only=True)
class EvaluateSection:
    batch: int = bounds(ge=1)
    num_workers: int = bounds(ge=0)
    weights: list[Literal["ema", "raw"]]    # evaluated when present in the checkpoint
    test_res: int | None = bounds(ge=16, default=None)  # null: the checkpoint's test resolution
    crop_pct: float | None = bounds(gt=0, le=1, default=None)  # null: the checkpoint's crop
    interpolation: Literal["bilinear", "bicubic"] | None = None  # null: the checkpoint's
    calibration_bins: int = bounds(ge=1, default=15)
    compile: bool = False                  # torch.compile the model for the forward passes


@dataclass(kw_only=True)
class PublishSection:
    model_name: str
    license: str
    tags: list[str]
    datasets: list[str]
    weights: Literal["ema", "raw"] = "ema"
    repo: str | None = None            # org/name on the Hub; null = local folder only
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
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


def _exactly_one(obj: Any, where: str, a: str, b: str) -> None:
    if (getattr(obj, a) is None) == (getattr(obj, b) is None):
        raise RecipeError(f"'{where}': give exactly one of '{a}' and '{b}' (the other null or "
                          f"absent)")


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
            value = _convert(data[name], hints[name], prefix + name, src)
            _check_range(value, f.metadata.get("range"), prefix + name, src)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{src}: missing key '{prefix}{name}' ({_type_name(hints[name])}); "
                              f"every recipe must set it")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check(where)
        except RecipeError as e:
            raise RecipeError(f"{src}: {e}") from None
    return obj


def _check_range(value: Any, rng: Range | None, key: str, src: str) -> None:
    if rng is None or value is None:
        return
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        if not rng.ok(v):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            raise RecipeError(f"{src}: '{where}' must be {rng.describe()}, got {v!r}")


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
