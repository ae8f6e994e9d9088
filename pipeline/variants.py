"""The one table of NFNet variants, and building them through timm.

Facts come from DeepMind's `nfnets/base.py` (`nfnet_params`) and the paper (Table 3); see
../shared/reference/nfnet.md. F0-F6 are timm's DeepMind-compatible `dm_nfnet_f*` models. timm has no
DeepMind F7 (its `nfnet_f7` differs in gamma_in_act, same_padding and skipinit), so F7 is
`dm_nfnet_f6` with F7's depths. FN+ variants widen the blocks to (384, 768, 2048, 2048).

Two things are set after timm builds the model, to match DeepMind's training:
- stochastic depth: block i of N drops its residual branch with rate * i / N and does not rescale
  the kept ones (timm ramps to the full rate over N - 1 and rescales by the keep probability);
- weight standardisation: DeepMind's formula, max(N * var, 1e-4) under the square root
  (pipeline/std_conv.py; timm adds an eps to the variance instead). `model_args` carry timm's
  closest setting (`std_conv_eps` 1e-10), so plain timm rebuilds the network from config.json.
GELU stays timm's exact erf form (DeepMind's JAX default is the tanh approximation; the difference
is below 1e-3, and timm accepts no tanh GELU for these models).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.layers import DropPath
from torch import nn

from pipeline.std_conv import TIMM_REBUILD_EPS, use_deepmind_ws

BASE_WIDTHS = (256, 512, 1536, 1536)
PLUS_WIDTHS = (384, 768, 2048, 2048)


@dataclass(frozen=True)
class Variant:
    name: str
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    train_res: int                 # ImageNet training resolution (px)
    test_res: int                  # evaluation resolution (px)
    randaugment_layers: int
    randaugment_magnitude: int
    drop_rate: float
    params_m: float | None      # parameters in millions at 1000 classes (paper / DeepMind)
    timm_arch: str                 # the timm model it is built from
    # Only the tiny test variants change these; the F-variants keep DeepMind's.
    arch_overrides: dict = field(default_factory=dict)
    family: str = "nfnet"          # "nfnet", or "batchnorm" for the BN baselines

    @property
    def crop_mode(self) -> str:
        # DeepMind evaluates NFNets by resizing to (S + 32) x (S + 32), ignoring aspect, then a
        # centre crop of S (timm's "squash"); BN ResNets the standard way ("center", 224 / 256).
        return "center" if self.family == "batchnorm" else "squash"

    @property
    def crop_pct(self) -> float:
        return 0.875 if self.family == "batchnorm" else self.test_res / (self.test_res + 32)

    def model_args(self, width: float = 1.0) -> dict[str, Any]:
        """Keyword arguments that turn `timm_arch` into this variant (JSON-serialisable)."""
        args: dict[str, Any] = dict(self.arch_overrides)
        if self.family == "batchnorm":
            if width != 1.0:
                raise ValueError(f"model.width applies to NFNets only, not {self.name}")
            return args
        args["std_conv_eps"] = TIMM_REBUILD_EPS
        timm_depths = _TIMM_DEPTHS.get(self.timm_arch)
        if timm_depths != self.depths:
            args["depths"] = list(self.depths)
        widths = tuple(int(w * width) for w in self.widths)
        if widths != BASE_WIDTHS and "channels" not in args:
            # DeepMind: the stem ends at pattern[0] // 2 (not width-scaled), final conv = 2 x last.
            args.update(channels=list(widths), stem_chs=self.widths[0] // 2,
                        num_features=2 * widths[-1])
        return args


_TIMM_DEPTHS = {f"dm_nfnet_f{i}": d for i, d in enumerate(
    [(1, 2, 6, 3), (2, 4, 12, 6), (3, 6, 18, 9), (4, 8, 24, 12), (5, 10, 30, 15),
     (6, 12, 36, 18), (7, 14, 42, 21)])}

_F = [  # name, depths, train, test, RA magnitude, dropout, params (M)
    ("f0", (1, 2, 6, 3), 192, 256, 5, 0.2, 71.5),
    ("f1", (2, 4, 12, 6), 224, 320, 10, 0.3, 132.6),
    ("f2", (3, 6, 18, 9), 256, 352, 10, 0.4, 193.8),
    ("f3", (4, 8, 24, 12), 320, 416, 15, 0.4, 254.9),
    ("f4", (5, 10, 30, 15), 384, 512, 15, 0.5, 316.1),
    ("f5", (6, 12, 36, 18), 416, 544, 15, 0.5, 377.2),
    ("f6", (7, 14, 42, 21), 448, 576, 15, 0.5, 438.4),
    ("f7", (8, 16, 48, 24), 480, 608, 15, 0.5, 499.5),
]

VARIANTS: dict[str, Variant] = {}
for _name, _depths, _train, _test, _mag, _drop, _params in _F:
    _arch = f"dm_nfnet_{_name}" if _name != "f7" else "dm_nfnet_f6"
    VARIANTS[_name] = Variant(_name, _depths, BASE_WIDTHS, _train, _test, 4, _mag, _drop, _params, _arch)
    # FN+: same recipe facts, wider blocks. The paper quotes 527 M for F4+; DeepMind's own
    # stem (16, 32, 64) gives ~0.08 M fewer than timm's (24, 48, 96) rounding: see tests.
    VARIANTS[_name + "+"] = Variant(_name + "+", _depths, PLUS_WIDTHS, _train, _test, 4, _mag, _drop,
                                    527.0 if _name == "f4" else None, _arch)

# A tiny NFNet with every F-variant block feature (SE, grouped convs, skip gains, WS gains), for
# tests and the CPU demo. Ours: sized to train on 32-64 px digits in minutes on 2 CPU cores.
VARIANTS["tiny"] = Variant(
    "tiny", (1, 1, 1, 1), (32, 64, 96, 128), 32, 48, 2, 5, 0.0, None, "dm_nfnet_f0",
    arch_overrides=dict(depths=[1, 1, 1, 1], channels=[32, 64, 96, 128], stem_chs=16,
                        group_size=16, num_features=256))


# The batch-normalised baselines the paper measures NFNets against (Ioffe & Szegedy 2015 BN in
# every block), built by timm as they are: standard ImageNet 224 px train and test.
VARIANTS["resnet50"] = Variant("resnet50", (3, 4, 6, 3), (256, 512, 1024, 2048), 224, 224, 0, 0,
                               0.0, 25.6, "resnet50", family="batchnorm")
VARIANTS["seresnext50"] = Variant("seresnext50", (3, 4, 6, 3), (256, 512, 1024, 2048), 224, 224,
                                  0, 0, 0.0, 27.6, "seresnext50_32x4d", family="batchnorm")
# A tiny BN ResNet for tests and the CPU demo comparison: 0.33 M parameters, twice the tiny NFNet
# (timm keeps its 64-channel 7x7 stem whatever stem_width says); reports/nf_vs_bn.md compares them.
VARIANTS["tiny_bn"] = Variant(
    "tiny_bn", (1, 1, 1, 1), (16, 32, 64, 128), 32, 48, 0, 0, 0.0, None, "resnet18",
    arch_overrides=dict(layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], stem_width=16),
    family="batchnorm")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown NFNet variant '{name}'. Known: {', '.join(VARIANTS)}") from None


def set_stochastic_depth(model: nn.Module, rate: float) -> None:
    """DeepMind's stochastic depth: block i (0-based, over all stages) of N uses rate * i / N,
    and kept branches are not rescaled."""
    blocks = [m for m in model.modules() if hasattr(m, "drop_path") and hasattr(m, "skipinit_gain")]
    for i, block in enumerate(blocks):
        r = rate * i / len(blocks)
        block.drop_path = DropPath(r, scale_by_keep=False) if r > 0 else nn.Identity()


def build_model(variant: str, num_classes: int, drop_rate: float = 0.0,
                drop_path_rate: float = 0.0, width: float = 1.0,
                device: str | torch.device | None = None,
                seed: int | None = None) -> tuple[nn.Module, str, dict]:
    """Build an NFNet variant through timm; with `seed`, its initial weights depend only on it
    (every process of a run, and every run of a recipe, starts from the same weights).

    Returns (model, timm architecture name, model_args): `timm.create_model(arch, **model_args)`
    rebuilds the same network, which is what the published config.json records.
    """
    v = get_variant(variant)
    model_args = v.model_args(width)
    with torch.device(device) if device is not None else contextlib.nullcontext(), \
            torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        extra = {"drop_path_rate": drop_path_rate} if v.family == "batchnorm" else {}
        model = timm.create_model(v.timm_arch, pretrained=False, num_classes=num_classes,
                                  drop_rate=drop_rate, **model_args, **extra)
    if v.family == "nfnet":
        set_stochastic_depth(model, drop_path_rate)
        use_deepmind_ws(model)
    return model, v.timm_arch, model_args


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
