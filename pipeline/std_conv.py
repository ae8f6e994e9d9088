"""DeepMind's Scaled Weight Standardization, as a drop-in for timm's ScaledStdConv2d(Same).

DeepMind (`nfnets/base.py`, WSConv2D) standardises each output filter over its fan-in N:

    w_hat = gain * (w - mean(w)) * rsqrt(max(N * var(w), 1e-4))

timm's ScaledStdConv2d computes gain * (w - mean) / sqrt(N * (var + eps)) with eps = 1e-5 for the
dm_nfnet models (`NfCfg.std_conv_eps`): for the same weights the logits differ by 1.7-3% of the
largest logit (F0, F1). timm's eps cannot be 0 (its F.batch_norm trick rejects it), so the exact
formula needs a layer of our own. `use_deepmind_ws(model)` switches every ScaledStdConv2d(Same) of
a built timm model to it in place: the same parameters (weight, gain, bias) and state-dict names,
so checkpoints load either way.

A plain timm user rebuilds our networks from config.json with `std_conv_eps` set to
`TIMM_REBUILD_EPS` (1e-10, in `model_args`): for every filter with N * var >= 1e-4 (all of them
in trained networks) that is DeepMind's formula up to float rounding; `use_deepmind_ws` makes it
exact (tests/test_std_conv.py measures both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame
from timm.layers.padding import pad_same
from torch import nn

DEEPMIND_EPS = 1e-4          # the floor on N * var (nfnets/base.py)
TIMM_REBUILD_EPS = 1e-10     # timm's std_conv_eps that comes closest (must be > 0)


def deepmind_standardize(weight: torch.Tensor, gain: torch.Tensor, gamma: float = 1.0,
                         eps: float = DEEPMIND_EPS) -> torch.Tensor:
    """gain * gamma * (w - mean) * rsqrt(max(N * var, eps)), per output filter (population
    variance over the fan-in N = in/groups * kh * kw). `gamma` is timm's activation gain folded
    into the weights (1.0 for dm_nfnet, whose activations carry it)."""
    flat = weight.flatten(1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    fan_in = flat.shape[1]
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps))
    w = (flat - mean) * (scale * gain.reshape(-1, 1) * gamma)     # the small factors first
    return w.reshape_as(weight)


class _DeepMindWS:
    """The forward of both padding flavours (the class of a timm conv is swapped to a subclass
    of it with this mixin first, so timm's attributes and parameters stay)."""

    def standardized_weight(self) -> torch.Tensor:
        # timm folds gamma / sqrt(fan_in) into self.scale; DeepMind's formula has the fan-in
        # inside the rsqrt, so recover gamma from it
        gamma = float(self.scale) * self.weight[0].numel() ** 0.5
        return deepmind_standardize(self.weight, self.gain, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "same_pad", False):              # ScaledStdConv2dSame's dynamic padding
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class DeepMindStdConv2d(_DeepMindWS, ScaledStdConv2d):
    pass


class DeepMindStdConv2dSame(_DeepMindWS, ScaledStdConv2dSame):
    pass


_SWAP = {ScaledStdConv2d: DeepMindStdConv2d, ScaledStdConv2dSame: DeepMindStdConv2dSame}


def use_deepmind_ws(model: nn.Module) -> int:
    """Switch every timm scaled-WS conv of `model` to DeepMind's formula in place; returns how
    many. Parameters, buffers and state-dict names are unchanged."""
    count = 0
    for m in model.modules():
        new = _SWAP.get(type(m))
        if new is not None:
            m.__class__ = new
            count += 1
    return count


def uses_deepmind_ws(model: nn.Module) -> bool:
    return any(isinstance(m, _DeepMindWS) for m in model.modules())


def applies_to(architecture: str) -> bool:
    """Every DeepMind NFNet (timm's dm_nfnet_*, our F-variants, FN+ and tiny) standardises its
    weights DeepMind's way here, whether it was built by us or loaded from timm or the Hub."""
    return architecture.startswith("dm_nfnet")


def rebuild_args(architecture: str, model_args: dict) -> dict:
    """config.json's model_args: for a DeepMind NFNet, timm's closest std_conv_eps added."""
    if applies_to(architecture) and "std_conv_eps" not in model_args:
        return {**model_args, "std_conv_eps": TIMM_REBUILD_EPS}
    return dict(model_args)
