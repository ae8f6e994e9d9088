"""Adaptive Gradient Clipping (Brock et al. 2021, Sec. 4) and the parameter grouping around it.

For each unit i of a weight W with gradient G (a unit is one output row: an output channel of a
conv over its whole fan-in, a row of a linear layer):

    if ||G_i|| / max(||W_i||, eps) > lambda:   G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i

Gains, biases and scalar skip gains are one unit each (DeepMind's `unitwise_norm` takes the norm of
the whole tensor when it has at most one dimension; timm's WS gains have shape (O, 1, 1, 1) but are
the same vectors, so they are whole units here too). The final classifier's weight is not clipped;
it is selected by module (`model.get_classifier()`), not by its position in the parameter list.

Why our own: timm's `adaptive_clip_grad` loops over tensors (~8 small kernels each; 35-39 ms per F0
step on an H100, measured in ../shared/gpu/README.md). Here small tensors with the same unit length
are concatenated into one matrix (a few kernels per distinct unit length instead of per tensor),
large tensors are read once for their norms and scaled in place through views, the clip factors
of all units are computed together, and nothing waits on the GPU (no `.item()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def is_gain_like(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, skip gains, norm-layer affines: one AGC unit each and no weight decay."""
    return param.ndim <= 1 or name.endswith("gain")


@dataclass
class ParamSplit:
    """The parameters of a model sorted the way DeepMind's optimiser treats them."""
    decay: list[nn.Parameter] = field(default_factory=list)      # conv / linear weights
    no_decay: list[nn.Parameter] = field(default_factory=list)   # gains, biases, skip gains
    clip: list[nn.Parameter] = field(default_factory=list)       # all but the classifier weight
    clip_whole: list[bool] = field(default_factory=list)         # per clip param: one unit?
    clip_names: list[str] = field(default_factory=list)
    not_clipped: list[str] = field(default_factory=list)


def split_parameters(model: nn.Module) -> ParamSplit:
    """Split trainable parameters into weight-decay groups and the AGC set.

    The classifier is found with `get_classifier()` (timm models), so the excluded weight is the
    final linear layer whatever order the parameters come in.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_weight = getattr(head, "weight", None) if isinstance(head, nn.Module) else None
    split = ParamSplit()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        gain_like = is_gain_like(name, p)
        (split.no_decay if gain_like else split.decay).append(p)
        if head_weight is not None and p is head_weight:
            split.not_clipped.append(name)
            continue
        split.clip.append(p)
        split.clip_whole.append(gain_like)
        split.clip_names.append(name)
    return split


@dataclass
class _Group:
    index: list[int]   # positions in the parameter list
    rows: list[int]    # units per parameter
    unit_len: int


def group_by_shape(shapes: list[torch.Size], whole: list[bool], solo_numel: int = 1 << 18
                ) -> list[_Group]:
    """Group tensors into (sum of rows, unit_len) matrices, one matrix per group.

    Small tensors with the same unit length are concatenated (one norm kernel for many tensors:
    launches dominate for them). Tensors of `solo_numel` elements or more are their own group,
    read and scaled in place through a view (bandwidth dominates: a copy would cost more).
    """
    groups: dict[object, _Group] = {}
    for i, (shape, w) in enumerate(zip(shapes, whole)):
        numel = 1
        for s in shape:
            numel *= s
        rows = 1 if w or len(shape) == 0 else shape[0]
        k = numel // rows
        key = ("solo", i) if numel >= solo_numel else k
        g = groups.setdefault(key, _Group([], [], k))
        g.index.append(i)
        g.rows.append(rows)
    return list(groups.values())


def _rows(t: torch.Tensor, rows: int, k: int) -> tuple[torch.Tensor, bool]:
    """`t` as a (rows, k) matrix with one unit per row; True if it is a view of `t`.

    A unit's norm ignores the order of its elements, so a channels_last conv tensor is read through
    its contiguous (O, H, W, I) permutation: still a view, no copy.
    """
    if t.is_contiguous():
        return t.view(rows, k), True
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(rows, k), True
    return t.reshape(rows, k), False


@torch.no_grad()
def unitwise_clip_(grads: list[torch.Tensor], weights: list[torch.Tensor], whole: list[bool],
                   clip_factor: float, eps: float = 1e-3,
                   groups: list[_Group] | None = None) -> None:
    """Clip `grads` in place, unit-wise against `weights` (the AGC rule above).

    `whole[i]` marks tensors that are one unit (gains, biases). `groups` may be precomputed with
    `group_by_shape` for speed; it depends only on the shapes. No `.item()`: nothing waits on the GPU.
    """
    if not grads:
        return
    if groups is None:
        groups = group_by_shape([g.shape for g in grads], whole)
    mats, views, g_norms, w_norms = [], [], [], []
    for grp in groups:
        gv = [_rows(grads[i], r, grp.unit_len) for i, r in zip(grp.index, grp.rows)]
        wv = [_rows(weights[i], r, grp.unit_len)[0] for i, r in zip(grp.index, grp.rows)]
        g = gv[0][0] if len(gv) == 1 else torch.cat([v for v, _ in gv])
        w = wv[0] if len(wv) == 1 else torch.cat(wv)
        mats.append(g)
        views.append(gv)
        g_norms.append(torch.linalg.vector_norm(g, dim=1, dtype=torch.float32))
        w_norms.append(torch.linalg.vector_norm(w, dim=1, dtype=torch.float32))
    g_norm = torch.cat(g_norms)
    max_norm = torch.cat(w_norms).clamp_(min=eps).mul_(clip_factor)
    # min(1, max_norm / ||G||) equals the paper's "if ratio > lambda: rescale"; 1e-6 guards 0 / 0
    # (then max_norm / 1e-6 >= 10 and the scale stays 1), as in DeepMind's agc_optax.py.
    scale = max_norm.div_(g_norm.clamp_(min=1e-6)).clamp_(max=1.0)
    dst, src = [], []
    for grp, g, gv, s in zip(groups, mats, views, scale.split([sum(grp.rows) for grp in groups])):
        g.mul_(s.to(g.dtype).unsqueeze(1))
        if len(gv) == 1 and gv[0][1]:
            continue                                   # scaled in place through the view
        for i, (v, is_view), part in zip(grp.index, gv, g.split(grp.rows)):
            if is_view:
                dst.append(v)
                src.append(part)
            else:
                grads[i].copy_(part.reshape(grads[i].shape))
    if dst:
        torch._foreach_copy_(dst, src)


class AGC:
    """AGC bound to a parameter list: plans the grouping once, clips `.grad` in place on call.

    Call it once per optimiser step, after gradients are reduced across processes and accumulated
    (inside `if accelerator.sync_gradients:`), before weight decay and momentum are applied.
    """

    def __init__(self, params: list[nn.Parameter], whole: list[bool], clip_factor: float,
                 eps: float = 1e-3, solo_numel: int | None = None):
        self.params = list(params)
        self.whole = list(whole)
        self.clip_factor = clip_factor
        self.eps = eps
        if solo_numel is None:
            # Where a tensor is worth its own kernels rather than a copy into a group: a GPU kernel
            # launch (~5 us) moves ~16 MB at HBM speed, so only big tensors go alone there; on a
            # CPU the copy is what costs (measured: benchmarks/agc_bench.py).
            on_gpu = bool(self.params) and self.params[0].device.type == "cuda"
            solo_numel = 1 << 22 if on_gpu else 1 << 12
        self.groups = group_by_shape([p.shape for p in self.params], self.whole, solo_numel)

    @classmethod
    def for_model(cls, model: nn.Module, clip_factor: float, eps: float = 1e-3) -> AGC:
        split = split_parameters(model)
        return cls(split.clip, split.clip_whole, clip_factor, eps)

    def __call__(self) -> None:
        pairs = [(p.grad, p) for p in self.params if p.grad is not None]
        if len(pairs) != len(self.params):
            # some parameters got no gradient this step (unused branch): plan for the rest
            keep = [i for i, p in enumerate(self.params) if p.grad is not None]
            grads = [self.params[i].grad for i in keep]
            weights = [self.params[i] for i in keep]
            whole = [self.whole[i] for i in keep]
            unitwise_clip_(grads, weights, whole, self.clip_factor, self.eps)
            return
        unitwise_clip_([g for g, _ in pairs], [p for _, p in pairs], self.whole,
                       self.clip_factor, self.eps, self.groups)
