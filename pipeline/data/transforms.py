"""Image transforms: timm's per-image transforms, and DeepMind's batch MixUp + CutMix.

Per image (dataloader workers, CPU): timm's `transforms_imagenet_train` / `_eval`, returning uint8
CHW tensors; normalisation happens on the device (4x less data through the worker queues).

Where timm's defaults differ from DeepMind's training, and what we set:
- RandAugment: timm caps magnitude at 10 and applies each chosen op with probability 0.5. We raise
  the cap (`mmax`) to the recipe's magnitude and apply every chosen op (`p1.0`), as DeepMind does.
  Still different: timm's op list has no Cutout and translates relative to the image size.
- Colour jitter: off (DeepMind uses none; timm's default is 0.4 when RandAugment is off).
- MixUp / CutMix: timm's `Mixup` switches the whole batch between the two; DeepMind mixes one half
  of each batch with MixUp (per-example ratio ~ Beta(alpha, alpha)) and the other half with
  CutMix (per-example box, area fraction ~ U(0, 1)). `mix_batch` does the latter. One difference
  stays, on purpose: DeepMind loads 2x the batch and mixes disjoint pairs, so each step consumes
  twice the images; here each image is mixed with another of the same batch (the batch reversed),
  so data loading, the most expensive part on GPU, is not doubled.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

from pipeline.recipe import AugmentSection

MEAN = IMAGENET_DEFAULT_MEAN
STD = IMAGENET_DEFAULT_STD


def randaugment_spec(layers: int, magnitude: int) -> Optional[str]:
    """timm's RandAugment config string matching DeepMind's RA (every op applied, m up to 15)."""
    if layers <= 0:
        return None
    return f"rand-m{magnitude}-n{layers}-mmax{max(10, magnitude)}-p1.0"


def train_transform(res: int, augment: AugmentSection):
    return transforms_imagenet_train(
        img_size=res,
        scale=tuple(augment.crop_scale),
        ratio=(3 / 4, 4 / 3),
        hflip=0.5 if augment.hflip else 0.0,
        color_jitter=None,
        auto_augment=randaugment_spec(augment.randaugment_layers, augment.randaugment_magnitude),
        interpolation=augment.interpolation,
        mean=MEAN, std=STD,
        use_prefetcher=True,      # uint8 tensors out; normalised on the device
    )


def eval_transform(res: int | tuple[int, int], crop_pct: float, interpolation: str = "bicubic",
                   crop_mode: str = "squash", mean: tuple = MEAN, std: tuple = STD):
    """timm's eval transform (resize, centre crop) returning uint8 tensors: the one used by
    evaluation, validation during training and the reports; `normalize` finishes it on the device."""
    return transforms_imagenet_eval(img_size=res, crop_pct=crop_pct, crop_mode=crop_mode,
                                    interpolation=interpolation, mean=mean, std=std,
                                    use_prefetcher=True)


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device and statistics: no host-to-device copy in every step
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(images: torch.Tensor, channels_last: bool = False, mean: tuple = MEAN,
              std: tuple = STD) -> torch.Tensor:
    """uint8 NCHW batch (on its device) -> float, normalised with `mean` / `std` (0..1 units).
    The one normalisation of the project: training, evaluation and the reports use it."""
    m, s = _mean_std(images.device, tuple(mean), tuple(std))
    x = images.float().sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def mix_batch(images: torch.Tensor, labels: torch.Tensor, mixup_alpha: float,
              cutmix_alpha: float, rng: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepMind's MixUp on the first half and CutMix on the second half of a batch.

    Each image is mixed with the image at the mirrored position (the batch reversed). Returns
    (images, labels_a, labels_b, ratio): the loss is ratio * CE(a) + (1 - ratio) * CE(b).
    With only one of the two enabled, it is applied to the whole batch. The random numbers come
    from `rng` (seeded per step by the trainer), so a resumed run mixes identically.
    """
    n = images.shape[0]
    dev = images.device
    ratio = torch.ones(n, device=dev)
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or n < 2:
        return images, labels, labels, ratio
    partner = torch.arange(n - 1, -1, -1, device=dev)
    split = n // 2 if (use_mixup and use_cutmix) else (n if use_mixup else 0)
    out = images.clone()
    if split > 0:
        lam = torch.from_numpy(rng.beta(mixup_alpha, mixup_alpha, split)).float().to(dev)
        lam4 = lam.view(-1, 1, 1, 1).to(images.dtype)
        out[:split] = lam4 * images[:split] + (1 - lam4) * images[partner[:split]]
        ratio[:split] = lam
    if split < n:
        m = n - split
        h, w = images.shape[-2:]
        # DeepMind's cutmix_padding: box centre uniform, side ratio sqrt(1 - lam) with
        # lam ~ Beta(alpha, alpha) (DeepMind: U(0, 1), i.e. alpha = 1); the box keeps the image's
        # own pixels and its label weight is the box's area fraction.
        lam = rng.beta(cutmix_alpha, cutmix_alpha, m)
        u = torch.from_numpy(np.stack([lam, rng.random(m), rng.random(m)])).float().to(dev)
        side = torch.sqrt(1 - u[0])
        cy, cx = (u[1] * h).floor(), (u[2] * w).floor()
        rh, rw = (side * h).floor(), (side * w).floor()
        y1, y2 = (cy - (rh // 2)).clamp(0, h), (cy + (rh // 2)).clamp(0, h)
        x1, x2 = (cx - (rw // 2)).clamp(0, w), (cx + (rw // 2)).clamp(0, w)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys >= y1.view(-1, 1, 1)) & (ys < y2.view(-1, 1, 1))
                  & (xs >= x1.view(-1, 1, 1)) & (xs < x2.view(-1, 1, 1)))   # (m, h, w)
        keep = inside.unsqueeze(1).to(images.dtype)
        out[split:] = keep * images[split:] + (1 - keep) * images[partner[split:]]
        ratio[split:] = inside.float().mean(dim=(1, 2))
    return out, labels, labels[partner], ratio


def mixed_cross_entropy(logits: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor,
                        ratio: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy
    la = ce(logits, labels_a, reduction="none", label_smoothing=label_smoothing)
    lb = ce(logits, labels_b, reduction="none", label_smoothing=label_smoothing)
    return (ratio * la + (1 - ratio) * lb).mean()
