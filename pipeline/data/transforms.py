"""Image transforms: timm's per-image transforms, split where DeepMind's mixing sits between them.

Per image (dataloader workers, CPU): timm's `transforms_imagenet_train` in its three parts
(crop + flip, RandAugment, to a uint8 CHW tensor) and `transforms_imagenet_eval`; normalisation
happens on the device (4x less data through the worker queues). `TrainAugment` says which parts
run where, around the MixUp / CutMix examples of pipeline/data/mixing.py:

    randaugment_order: before_mix   crop, flip, RandAugment per image; then mix (on the device)
    randaugment_order: after_mix    crop, flip per image; mix; RandAugment per mixed example
                                    (DeepMind's `augment_before_mix=False`; in the worker on the
                                    CPU path, on the device with `loader.decode: device`)

Where timm's defaults differ from DeepMind's training, and what we set:
- RandAugment: timm caps magnitude at 10 and applies each chosen op with probability 0.5. We raise
  the cap (`mmax`) to the recipe's magnitude and apply every chosen op (`p1.0`), as DeepMind does.
  Still different (README, "Fidelity to DeepMind's code"): timm's op list has no Cutout,
  translates relative to the image size, interpolates bicubic and fills with the mean colour.
- Colour jitter: off (DeepMind uses none; timm's default is 0.4 when RandAugment is off).
- MixUp / CutMix: timm's `Mixup` switches the whole batch between the two; DeepMind mixes half of
  the examples with each (pipeline/data/mixing.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

from pipeline.data.mixing import images_per_example, mixing_on
from pipeline.recipe import AugmentSection

MEAN = IMAGENET_DEFAULT_MEAN
STD = IMAGENET_DEFAULT_STD


def randaugment_spec(layers: int, magnitude: int) -> str | None:
    """timm's RandAugment config string matching DeepMind's RA (every op applied, m up to 15)."""
    if layers <= 0:
        return None
    return f"rand-m{magnitude}-n{layers}-mmax{max(10, magnitude)}-p1.0"


def train_transform(res: int, augment: AugmentSection):
    """timm's whole train transform (crop, flip, RandAugment, uint8 tensor), for one image."""
    return transforms_imagenet_train(**_train_args(res, augment))


def _train_args(res: int, augment: AugmentSection) -> dict:
    return dict(img_size=res, scale=tuple(augment.crop_scale), ratio=(3 / 4, 4 / 3),
                hflip=0.5 if augment.hflip else 0.0, color_jitter=None,
                auto_augment=randaugment_spec(augment.randaugment_layers,
                                              augment.randaugment_magnitude),
                interpolation=augment.interpolation, mean=MEAN, std=STD,
                use_prefetcher=True)        # uint8 tensors out; normalised on the device


@dataclass
class TrainAugment:
    """What the training input does to images, and in which order (see the module docstring)."""
    res: int
    crop_flip: Callable                  # PIL -> PIL (timm's primary transforms)
    randaugment: Callable | None         # PIL -> PIL, or None when RandAugment is off
    to_tensor: Callable                  # PIL -> uint8 CHW tensor
    pairs: str                           # mixing.PAIRS
    mixup_alpha: float
    cutmix_alpha: float
    randaugment_after_mix: bool

    @property
    def mixing(self) -> bool:
        return mixing_on(self.mixup_alpha, self.cutmix_alpha)

    @property
    def images_per_example(self) -> int:
        return images_per_example(self.pairs, self.mixup_alpha, self.cutmix_alpha)

    @property
    def ra_after_mix(self) -> bool:
        """RandAugment runs on mixed examples (only meaningful when there is mixing and RA)."""
        return self.randaugment_after_mix and self.mixing and self.randaugment is not None


def train_augment(res: int, augment: AugmentSection) -> TrainAugment:
    primary, secondary, final = transforms_imagenet_train(**_train_args(res, augment),
                                                          separate=True)
    ra = secondary if augment.randaugment_layers > 0 else None
    return TrainAugment(res, primary, ra, final, augment.mix_pairs, augment.mixup_alpha,
                        augment.cutmix_alpha, augment.randaugment_order == "after_mix")


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


def mixed_cross_entropy(logits: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor,
                        ratio: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy
    la = ce(logits, labels_a, reduction="none", label_smoothing=label_smoothing)
    lb = ce(logits, labels_b, reduction="none", label_smoothing=label_smoothing)
    return (ratio * la + (1 - ratio) * lb).mean()
