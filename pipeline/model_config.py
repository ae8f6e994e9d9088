"""config.json, the description of a model that travels from stage to stage, as one typed record.

A model folder (`<stage out>/model/`, or a folder the publish stage wrote) is weights plus
config.json. The training stages write it; evaluate, finetune (`--init`) and publish read it; and
so does timm: `timm.create_model("local-dir:<folder>", pretrained=True)` builds the network from
`architecture` and `model_args` and prepares test images from `pretrained_cfg`. This module is the
only place that reads or writes the file (`ModelConfig.load` / `save`); everything else uses the
attributes, so a key means the same, with the same default, in every stage.

The file is timm's hub format plus our block:
    architecture     the timm model name                                  required
    model_args       keyword arguments of timm.create_model               {}
    num_classes      classes of the head                                  required
    num_features     width of the pooled features                         (not written when unknown)
    global_pool      "avg"
    label_names      class names in index order                           [] (the indices name them)
    pretrained_cfg   test-time preprocessing (`Preprocessing`)            timm's defaults
    nfnet_pipeline   our lineage (`ModelConfig.lineage`): variant, width, recipe, stage, step,
                     fingerprint, mixed_precision, init, init_weights, init_res, ...    {}

Defaults, decided here once. A key that config.json lacks means what it means to timm's local-dir
loader, which fills a missing `pretrained_cfg` key from its `PretrainedCfg` defaults (224 px,
crop_pct 0.875, crop_mode "center", bicubic, ImageNet mean / std): evaluate, finetune, publish
and a timm user then prepare images the same way. Before this module the evaluate stage also
read "center" but fine-tuning read "squash" (the NFNet variants' crop), so one folder could be
evaluated one way and fine-tuned another. Every config.json this project has written carries all
these keys (since its first version, `git log -p -- pipeline/checkpoint.py`), so the defaults only
decide folders from elsewhere (timm's Hub folders, hand-written ones) and the configs that
fine-tuning makes for its other inits (pipeline/transfer.py), which state what they know.

Older files load as they are: the project's earlier config.json differs from today's only in
what it holds, not in its keys (model_args without `std_conv_eps`, rebuilt when the network is
built: std_conv.rebuild_args; a shorter `nfnet_pipeline` block); tests/data/old_config.json is
one (tests/test_model_config.py). Keys this module does not know are kept, not dropped or
refused: `extra` (top level) and `Preprocessing.extra` hold them and `to_dict` writes them back.
timm's own configs carry many (`label_descriptions`, `tag`, `hf_hub_id`, `license`, ...), and a
folder from the Hub or from a newer version of this project should load and save unchanged
rather than stop a stage. What must hold for the file to be usable (the two required keys, the
types of the known ones) is checked, and a problem is a ModelConfigError naming the file and key.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline import std_conv
from pipeline.data.transforms import MEAN, STD
from pipeline.files import atomic_write_text

CONFIG_NAME = "config.json"

# timm's PretrainedCfg defaults: what timm.create_model("local-dir:...") uses for a key the file
# lacks, and so ours (see the module docstring). MEAN and STD are timm's ImageNet defaults too.
TIMM_INPUT_SIZE = (3, 224, 224)
TIMM_CROP_PCT = 0.875
TIMM_CROP_MODE = "center"
TIMM_INTERPOLATION = "bicubic"

Size = tuple[int, int, int]             # (channels, height, width), as timm writes input sizes


class ModelError(RuntimeError):
    """A model folder, its config.json or a fine-tuning init cannot be used; the message names
    the file and what to do."""


class ModelConfigError(ModelError):
    """config.json is missing, not JSON, or lacks (or mistypes) a key; the message names both."""


def default_crop_pct(test_res: int, crop_mode: str) -> float:
    """DeepMind's NFNet eval resizes to (S + 32)^2 ignoring aspect ("squash"), then crops S;
    batch-norm ResNets are evaluated the standard way: shorter side to S / 0.875, centre crop S."""
    return test_res / (test_res + 32) if crop_mode == "squash" else TIMM_CROP_PCT


@dataclass(frozen=True)
class Preprocessing:
    """config.json's `pretrained_cfg`: how an image is prepared for the network at test time (and
    what resolution it was trained at). The raw fields are what the file says; `test_size` and
    `test_crop` resolve them the way timm's `resolve_data_config(..., use_test_size=True)` does."""
    input_size: Size | None = None          # trained at; None: not recorded (a random init)
    test_input_size: Size | None = None     # None: input_size
    crop_pct: float = TIMM_CROP_PCT
    test_crop_pct: float | None = None      # None: crop_pct
    crop_mode: str = TIMM_CROP_MODE         # "squash" (DeepMind's NFNets), "center", "border"
    interpolation: str = TIMM_INTERPOLATION
    mean: tuple[float, ...] = tuple(MEAN)
    std: tuple[float, ...] = tuple(STD)
    classifier: str | tuple[str, ...] | None = None     # the module timm swaps for a new head
    first_conv: str | tuple[str, ...] | None = None     # the module timm adapts to in_chans
    # other keys: a published folder's num_classes and license, timm's tag, pool_size, ...
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # sequences as tuples, however they were given, so that equal configs compare equal
        for name in ("input_size", "test_input_size", "mean", "std", "classifier", "first_conv"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def test_size(self) -> Size:
        """The resolution to test at: test_input_size, else input_size, else timm's 224 px."""
        return self.test_input_size or self.input_size or TIMM_INPUT_SIZE

    @property
    def test_crop(self) -> float:
        """The crop fraction at test time: test_crop_pct, else crop_pct."""
        return self.crop_pct if self.test_crop_pct is None else self.test_crop_pct

    @property
    def train_res(self) -> int | None:
        """The (square) training resolution, when recorded."""
        return self.input_size[-1] if self.input_size else None

    def resolved(self) -> Preprocessing:
        """Every size and crop stated (none left to a reader's default): what is published."""
        return dataclasses.replace(self, input_size=self.input_size or TIMM_INPUT_SIZE,
                                   test_input_size=self.test_size, test_crop_pct=self.test_crop)

    def to_dict(self) -> dict[str, Any]:
        """The `pretrained_cfg` block; a None field is left out (timm then reads its default)."""
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in known.items() if v is not None}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CONFIG_NAME) -> Preprocessing:
        """From a `pretrained_cfg` block; `where` names it in errors (`<file>: pretrained_cfg`)."""
        _check(isinstance(data, dict), where, "must be a mapping", data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        for key in ("input_size", "test_input_size"):
            if key in known:
                known[key] = _size(known[key], f"{where}.{key}")
        for key in ("crop_pct", "test_crop_pct"):
            if key in known:
                _check(_is_number(known[key]), f"{where}.{key}", "must be a number", known[key])
        for key in ("crop_mode", "interpolation"):
            if key in known:
                _check(isinstance(known[key], str), f"{where}.{key}", "must be a string", known[key])
        for key in ("mean", "std"):
            if key in known:
                known[key] = _numbers(known[key], f"{where}.{key}")
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.json (see the module docstring). Frozen: change a copy with
    `dataclasses.replace`; the dict fields are meant to be read, not modified in place."""
    architecture: str
    num_classes: int
    model_args: dict[str, Any] = field(default_factory=dict)
    label_names: tuple[str, ...] = ()       # as strings, the way the stages compare class names
    num_features: int | None = None
    global_pool: str = "avg"
    pretrained_cfg: Preprocessing = field(default_factory=Preprocessing)
    lineage: dict[str, Any] = field(default_factory=dict)    # the `nfnet_pipeline` block
    extra: dict[str, Any] = field(default_factory=dict)      # top-level keys not named above

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))

    # -- what the stages ask ------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """The class names, or the class indices as strings where the file names none."""
        return list(self.label_names) or [str(i) for i in range(self.num_classes)]

    @property
    def variant(self) -> str:
        """Our variant name (`tiny`, `f0`, ...), else the timm architecture."""
        return str(self.lineage.get("variant") or self.architecture)

    @property
    def init(self) -> str:
        """What fine-tuning started from (`--init`: a model folder, none:<variant>, ...), or ""."""
        return str(self.lineage.get("init") or "")

    @property
    def from_scratch(self) -> bool:
        """A fine-tuning init of random weights (none:<variant>)."""
        return bool(self.lineage.get("from_scratch"))

    def with_lineage(self, **facts: Any) -> ModelConfig:
        """A copy with `facts` added to (or replacing entries of) the lineage block."""
        return dataclasses.replace(self, lineage={**self.lineage, **facts})

    # -- made by a training stage --------------------------------------------------------------

    @classmethod
    def for_training(cls, model: nn.Module, *, architecture: str, model_args: dict[str, Any],
                     class_names: list[str], train_res: int, test_res: int,
                     crop_pct: float | None, crop_mode: str, interpolation: str,
                     lineage: dict[str, Any]) -> ModelConfig:
        """The config.json of a model a training stage trains: its resolutions, crop (None: the
        default of `crop_mode`, see default_crop_pct) and interpolation; the classifier and
        first conv as timm names them for the architecture; a DeepMind NFNet's model_args with
        timm's closest weight standardisation (std_conv.rebuild_args)."""
        timm_cfg = getattr(model, "pretrained_cfg", None) or {}
        crop = crop_pct or default_crop_pct(test_res, crop_mode)
        return cls(
            architecture=architecture, num_classes=len(class_names),
            model_args=std_conv.rebuild_args(architecture, model_args),
            label_names=tuple(class_names), num_features=int(getattr(model, "num_features", 0)),
            pretrained_cfg=Preprocessing(
                input_size=(3, train_res, train_res), test_input_size=(3, test_res, test_res),
                crop_pct=crop, test_crop_pct=crop, crop_mode=crop_mode,
                interpolation=interpolation,
                classifier=timm_cfg.get("classifier", "head.fc"),
                first_conv=timm_cfg.get("first_conv", "stem.conv1")),
            lineage=dict(lineage))

    # -- the file --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """config.json's content, keys in the order timm writes them; None is left out, and the
        lineage block when it is empty."""
        out: dict[str, Any] = {"architecture": self.architecture, "model_args": dict(self.model_args),
                               "num_classes": self.num_classes, "num_features": self.num_features,
                               "global_pool": self.global_pool, "label_names": list(self.label_names),
                               "pretrained_cfg": self.pretrained_cfg.to_dict(),
                               "nfnet_pipeline": dict(self.lineage) or None}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `<folder>/config.json` atomically (a temporary name, then a rename)."""
        return atomic_write_text(Path(folder) / CONFIG_NAME, self.to_json(), what=CONFIG_NAME)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> ModelConfig:
        """Check and type config.json's content; `source` (the file) is named in errors."""
        _check(isinstance(data, dict), source, "must hold a JSON object", data)
        for key, kind in (("architecture", str), ("num_classes", int)):
            _check(key in data, source, f"has no '{key}': expected a config.json written by the "
                   f"pretrain / finetune or publish stage (or timm's hub format)")
            _check(isinstance(data[key], kind) and not isinstance(data[key], bool),
                   f"{source}: {key}", f"must be {'a string' if kind is str else 'an integer'}",
                   data[key])
        for key in ("model_args", "nfnet_pipeline"):
            _check(isinstance(data.get(key) or {}, dict), f"{source}: {key}", "must be a mapping",
                   data.get(key))
        features = data.get("num_features")
        _check(features is None or isinstance(features, int), f"{source}: num_features",
               "must be an integer", features)
        labels = data.get("label_names") or []
        _check(isinstance(labels, list), f"{source}: label_names", "must be a list", labels)
        # the file's keys are the fields' names, except the lineage block's
        known = ({f.name for f in dataclasses.fields(cls)} - {"lineage", "extra"}) | {"nfnet_pipeline"}
        return cls(architecture=data["architecture"], num_classes=data["num_classes"],
                   model_args=dict(data.get("model_args") or {}),
                   label_names=tuple(labels),
                   num_features=data.get("num_features"),
                   global_pool=data.get("global_pool") or "avg",
                   pretrained_cfg=Preprocessing.from_dict(data.get("pretrained_cfg") or {},
                                                          f"{source}: pretrained_cfg"),
                   lineage=dict(data.get("nfnet_pipeline") or {}),
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """The config.json of a model folder (or the file itself)."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / CONFIG_NAME
        if not file.is_file():
            raise ModelConfigError(f"no {CONFIG_NAME} in {file.parent}: expected a model folder "
                                   f"written by the pretrain/finetune stage or the publish stage")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{file}: not a JSON config.json ({e})") from None
        return cls.from_dict(data, str(file))


# ------------------------------------------------------------------------------------------------
# Checks of the file's values
# ------------------------------------------------------------------------------------------------

def _check(ok: bool, where: str, problem: str, value: Any = dataclasses.MISSING) -> None:
    if not ok:
        got = "" if value is dataclasses.MISSING else f", got {json.dumps(value, default=str)}"
        raise ModelConfigError(f"{where} {problem}{got}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _size(value: Any, where: str) -> Size:
    _check(isinstance(value, (list, tuple)) and len(value) == 3
           and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
           where, "must be [channels, height, width] (3 integers)", value)
    return tuple(value)


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    _check(isinstance(value, (list, tuple)) and all(_is_number(v) for v in value),
           where, "must be a list of numbers", value)
    return tuple(value)
