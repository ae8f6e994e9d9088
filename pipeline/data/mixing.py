"""MixUp and CutMix examples, formed the way DeepMind's NFNet input pipeline forms them
(nfnets/dataset.py: `my_mixup_cutmix`, `cutmix_padding`).

An example is made from two images, a and b: a MixUp example blends them whole,
`ratio x a + (1 - ratio) x b`; a CutMix example takes a's pixels inside a box and b's outside,
and its ratio is the box's exact area fraction. The loss weighs a's label by the ratio and b's by
the rest (pipeline/step.py, `mixed_cross_entropy`).

Which images pair (`augment.mix_pairs`), within one stream's share of a micro-batch:
- `disjoint` (DeepMind): 2n images make n examples, image 2j with image 2j + 1. Every image is
  read once and mixed once, with a fresh partner each time the data comes round, so one optimiser
  step reads 2 x global_batch images.
- `in_batch` (cheaper): n images make n examples, image j with image n - 1 - j (the chunk
  reversed, as timm's Mixup pairs a batch with its flip). Each image appears in two examples; a
  chunk of one image mixes with itself (that is, not at all).

Which examples are CutMix (DeepMind: the second half of every device batch): decided by the
example's place in its stream, not its place in a chunk: CutMix when (stream + the example's
number in the stream) is odd. So every stream alternates, every micro-batch is half and half
(exactly, when it holds an even number of examples) whatever the number of processes, loader
workers and micro-batch, and an example is the same whichever worker or resume makes it. With
only one of MixUp / CutMix switched on (alpha > 0) every example uses that one.

Random numbers (DeepMind's distributions), from the example's own generator: MixUp ratio ~
Beta(mixup_alpha, mixup_alpha) (0.2 in the paper); CutMix: box area ~ Beta(cutmix_alpha,
cutmix_alpha) (alpha 1: U(0, 1)), side sqrt(1 - area) of the image's, centre uniform over the
pixels, halves truncated, the box clipped to the image (so its mean area is about 0.3).

Pixels: mixing runs on uint8 images (CutMix copies a box; MixUp computes in float32 and goes back
to uint8 by clipping and truncating, as DeepMind's RandAugment input cast does): `mix_into` for one
example in a CPU loader worker (straight from the two crops into the batch, no copies between),
`mix` for a micro-batch on the device. The two give the same pixels (tests/test_mixing.py).
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple

import numpy as np
import torch

PAIRS = ("disjoint", "in_batch")



class MixDraw(NamedTuple):
    """One example's mixing: CutMix or MixUp, the weight of image a, CutMix's box (y1, y2, x1,
    x2; zeros for MixUp)."""
    cutmix: bool
    ratio: float
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


def mixing_on(mixup_alpha: float, cutmix_alpha: float) -> bool:
    return mixup_alpha > 0 or cutmix_alpha > 0


def images_per_example(pairs: str, mixup_alpha: float, cutmix_alpha: float) -> int:
    """2 for DeepMind's disjoint pairs (when any mixing is on), else 1."""
    return 2 if pairs == "disjoint" and mixing_on(mixup_alpha, cutmix_alpha) else 1


def partners(pairs: str, n_images: int) -> list[tuple[int, int]]:
    """(image a, image b) of each example made from one stream's `n_images` images."""
    if pairs == "disjoint":
        if n_images % 2:
            raise ValueError(f"disjoint pairs need an even number of images, got {n_images}")
        return [(2 * j, 2 * j + 1) for j in range(n_images // 2)]
    if pairs == "in_batch":
        return [(j, n_images - 1 - j) for j in range(n_images)]
    raise ValueError(f"mix_pairs must be one of {PAIRS}, got {pairs!r}")


def is_cutmix(stream: int, number: int, mixup_alpha: float, cutmix_alpha: float) -> bool:
    """The kind of example `number` of `stream` (see the module docstring)."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        return (stream + number) % 2 == 1
    return cutmix_alpha > 0


def draw_mix(rng: random.Random, cutmix: bool, mixup_alpha: float, cutmix_alpha: float,
             size: tuple[int, int]) -> MixDraw:
    """An example's ratio (MixUp) or box (CutMix; DeepMind's `cutmix_padding`)."""
    if not cutmix:
        return MixDraw(False, rng.betavariate(mixup_alpha, mixup_alpha))
    h, w = size
    area = rng.betavariate(cutmix_alpha, cutmix_alpha)
    cy, cx = rng.randrange(h), rng.randrange(w)
    side = math.sqrt(1.0 - area)
    rh, rw = int(side * h), int(side * w)
    y1, y2 = min(max(cy - rh // 2, 0), h), min(max(cy + rh // 2, 0), h)
    x1, x2 = min(max(cx - rw // 2, 0), w), min(max(cx + rw // 2, 0), w)
    return MixDraw(True, (y2 - y1) * (x2 - x1) / (h * w), (y1, y2, x1, x2))


def mix_into(out: np.ndarray, a: np.ndarray, b: np.ndarray, draw: MixDraw) -> None:
    """One example on the CPU: `out` (H, W, 3) uint8 <- images a and b mixed by `draw`."""
    if draw.cutmix:
        out[...] = b
        y1, y2, x1, x2 = draw.box
        out[y1:y2, x1:x2] = a[y1:y2, x1:x2]
        return
    lam = np.float32(draw.ratio)
    fa = a.astype(np.float32)
    fa *= lam
    fb = b.astype(np.float32)
    fb *= np.float32(1.0) - lam
    fa += fb
    # a blend of two values in 0..255 stays below 256, so the truncating cast needs no clip
    # here (`mix` clips; the pixels are the same). In place, numpy's casts: 110 vs 480 us.
    out[...] = fa


def mix(a: torch.Tensor, b: torch.Tensor, draws: list[MixDraw]) -> torch.Tensor:
    """Mixed uint8 (n, H, W, 3) examples from images a and b (uint8 (n, H, W, 3), any device).
    CutMix copies each box (a slice per example on the CPU; one masked select on a GPU, where a
    kernel per example would cost more than the copy); MixUp blends in float32 the rows it
    concerns only. The pixels are the same either way."""
    n, h, w, _ = a.shape
    dev = a.device
    if dev.type == "cpu":
        out = b.clone()
        for i, d in enumerate(draws):
            y1, y2, x1, x2 = d.box
            if d.cutmix and y2 > y1 and x2 > x1:
                out[i, y1:y2, x1:x2] = a[i, y1:y2, x1:x2]
    else:
        box = torch.tensor([d.box for d in draws], dtype=torch.long).to(dev, non_blocking=True)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None])
                  & (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))   # (n, h, w)
        out = torch.where(inside[..., None], a, b)       # MixUp rows have no box: b, for now
    mixup = [i for i, d in enumerate(draws) if not d.cutmix]
    if mixup:
        idx = torch.tensor(mixup).to(dev, non_blocking=True)
        lam = torch.tensor([draws[i].ratio for i in mixup], dtype=torch.float32)
        lam = lam.to(dev, non_blocking=True).view(-1, 1, 1, 1)
        blended = lam * a.index_select(0, idx).float() + (1 - lam) * b.index_select(0, idx).float()
        out.index_copy_(0, idx, quantize(blended))
    return out


def quantize(mixed: torch.Tensor) -> torch.Tensor:
    """Mixed float pixels back to uint8 as DeepMind does before RandAugment: clip, truncate."""
    return mixed.clamp(0, 255).to(torch.uint8)
