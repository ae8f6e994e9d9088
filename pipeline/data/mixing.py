"""MixUp and CutMix examples, formed the way DeepMind's NFNet input pipeline forms them.

A *mix plan* says, for a chunk of images (one dataloader worker's share of a micro-batch), which
examples are made from which images: example i takes image `a[i]` with weight `ratio[i]` and image
`b[i]` with weight 1 - ratio[i]; a MixUp example blends the two whole images, a CutMix example
takes the pixels of `a[i]` inside its box and those of `b[i]` outside (the ratio is then the box's
exact area fraction). The plan is made where the images are read (the loader worker), from seeds
of the images themselves, so an example is the same whichever worker, process or resume makes it.

Two ways to pair (`augment.mix_pairs`):
- `disjoint` (DeepMind, `nfnets/dataset.py`): 2n images make n examples. The first half of the
  examples are MixUp pairs of quarter 1 with quarter 2 of the images, the second half CutMix pairs
  of quarter 3 with quarter 4. Every image is read once and mixed once, with a fresh partner each
  time the data comes round, so one optimiser step reads 2 x global_batch images.
- `in_batch` (cheaper): n images make n examples; image i is mixed with image n - 1 - i of the same
  chunk (the chunk reversed), MixUp on the first half, CutMix on the second. Each image is read
  once but appears in two examples.
With only one of MixUp / CutMix switched on (alpha > 0), every example uses that one; with neither,
no mixing happens and a plan is not made.

Random numbers (DeepMind's distributions): MixUp ratio ~ Beta(mixup_alpha, mixup_alpha) (0.2 in
the paper); CutMix: box area ~ Beta(cutmix_alpha, cutmix_alpha) (alpha 1: U(0, 1)), side ratio
sqrt(1 - area), centre uniform over the pixels, the box clipped to the image.

Mixed images are not whole numbers. Where RandAugment runs after mixing, `quantize` takes them
back to uint8 the way DeepMind does: clip to [0, 255], then truncate (not round).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAIRS = ("disjoint", "in_batch")


@dataclass
class MixPlan:
    """How n examples are made from the images of one chunk (all tensors on the CPU, length n)."""
    a: torch.Tensor        # long: the image whose label has weight `ratio` (inside a CutMix box)
    b: torch.Tensor        # long: its partner
    cutmix: torch.Tensor   # bool: CutMix (True) or MixUp (False)
    lam: torch.Tensor      # float: MixUp weight of image a (unused by CutMix rows)
    box: torch.Tensor      # long (n, 4): y1, y2, x1, x2 of the CutMix box (zeros for MixUp rows)
    seed: torch.Tensor     # long: the example's seed (example_seed of image a's): its ratio or
                           # box here, and its RandAugment operations when they follow the mix

    def __len__(self) -> int:
        return len(self.a)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"mix_a": self.a, "mix_b": self.b, "mix_cutmix": self.cutmix, "mix_lam": self.lam,
                "mix_box": self.box, "mix_seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> MixPlan:
        return cls(d["mix_a"], d["mix_b"], d["mix_cutmix"], d["mix_lam"], d["mix_box"], d["mix_seed"])

    def shifted(self, offset: int) -> MixPlan:
        """The same plan for images that now start at `offset` (chunks concatenated)."""
        return MixPlan(self.a + offset, self.b + offset, self.cutmix, self.lam, self.box, self.seed)

    @staticmethod
    def concat(plans: list[MixPlan], sizes: list[int]) -> MixPlan:
        """One plan for chunks of `sizes` images laid end to end."""
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        moved = [p.shifted(int(s)) for p, s in zip(plans, starts)]
        return MixPlan(*(torch.cat([getattr(p, f) for p in moved])
                         for f in ("a", "b", "cutmix", "lam", "box", "seed")))


def mixing_on(mixup_alpha: float, cutmix_alpha: float) -> bool:
    return mixup_alpha > 0 or cutmix_alpha > 0


def images_per_example(pairs: str, mixup_alpha: float, cutmix_alpha: float) -> int:
    """2 for DeepMind's disjoint pairs (when any mixing is on), else 1."""
    return 2 if pairs == "disjoint" and mixing_on(mixup_alpha, cutmix_alpha) else 1


def example_seed(image_seed: int) -> int:
    """The seed of an example, from the seed of its image a: its mixing ratio or box, and its
    RandAugment operations when they run after mixing."""
    return int(np.random.default_rng([image_seed, 0x313]).integers(2**31))


def make_plan(pairs: str, seeds: list[int], mixup_alpha: float, cutmix_alpha: float,
              size: tuple[int, int]) -> MixPlan:
    """The plan for a chunk of images whose per-image seeds are `seeds` (len 2n for `disjoint`,
    n for `in_batch`), at image size (h, w)."""
    k = len(seeds)
    n = k // 2 if pairs == "disjoint" else k
    if pairs == "disjoint":
        if k % 2:
            raise ValueError(f"disjoint pairs need an even number of images, got {k}")
        # quarters: MixUp rows from Q1 x Q2, CutMix rows from Q3 x Q4 (odd n: one more MixUp)
        m = (n + 1) // 2 if mixup_alpha > 0 and cutmix_alpha > 0 else (n if mixup_alpha > 0 else 0)
        c = n - m
        a = np.concatenate([np.arange(m), 2 * m + np.arange(c)])
        b = np.concatenate([m + np.arange(m), 2 * m + c + np.arange(c)])
    elif pairs == "in_batch":
        m = n // 2 if mixup_alpha > 0 and cutmix_alpha > 0 else (n if mixup_alpha > 0 else 0)
        a = np.arange(n)
        b = n - 1 - a
    else:
        raise ValueError(f"mix_pairs must be one of {PAIRS}, got {pairs!r}")
    cutmix = np.arange(n) >= m
    lam = np.ones(n)
    box = np.zeros((n, 4), np.int64)
    h, w = size
    example_seeds = np.array([example_seed(seeds[i]) for i in a.tolist()], np.int64)
    for i in range(n):
        rng = np.random.default_rng([int(example_seeds[i]), 1])
        if cutmix[i]:
            box[i] = _cutmix_box(rng, cutmix_alpha, h, w)
        else:
            lam[i] = rng.beta(mixup_alpha, mixup_alpha)
    return MixPlan(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(cutmix),
                   torch.from_numpy(lam).float(), torch.from_numpy(box),
                   torch.from_numpy(example_seeds))


def _cutmix_box(rng: np.random.Generator, alpha: float, h: int, w: int) -> np.ndarray:
    """DeepMind's `cutmix_padding`: centre uniform over the pixels, side sqrt(1 - area) of the
    image's, halves truncated, clipped to the image. Returns (y1, y2, x1, x2)."""
    area = rng.beta(alpha, alpha)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    side = np.sqrt(1.0 - area)
    rh, rw = int(side * h), int(side * w)
    return np.array([np.clip(cy - rh // 2, 0, h), np.clip(cy + rh // 2, 0, h),
                     np.clip(cx - rw // 2, 0, w), np.clip(cx + rw // 2, 0, w)])


def apply_plan(images: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed float images (n, C, H, W), ratio (n,)): the weight of image a in each example.
    `images` may be uint8 or float, on any device; the plan moves to it."""
    dev = images.device
    a, b = plan.a.to(dev, non_blocking=True), plan.b.to(dev, non_blocking=True)
    x = images.float()
    h, w = x.shape[-2:]
    box = plan.box.to(dev, non_blocking=True)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None])
              & (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))   # (n, h, w)
    cut = plan.cutmix.to(dev, non_blocking=True)
    # MixUp rows: a constant weight everywhere; CutMix rows: 1 inside the box, 0 outside
    lam = plan.lam.to(dev, non_blocking=True)
    weight = torch.where(cut.view(-1, 1, 1), inside.float(), lam.view(-1, 1, 1).expand(-1, h, w))
    weight = weight.unsqueeze(1)
    mixed = weight * x[a] + (1 - weight) * x[b]
    ratio = torch.where(cut, inside.float().mean(dim=(1, 2)), lam)
    return mixed, ratio


def quantize(mixed: torch.Tensor) -> torch.Tensor:
    """Mixed float pixels back to uint8 as DeepMind does before RandAugment: clip, truncate."""
    return mixed.clamp(0, 255).to(torch.uint8)
