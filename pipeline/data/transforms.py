"""The evaluation transform (timm's) and the project's one normalisation.

Training examples are made in pipeline/data/examples.py. Evaluation, validation during training
and the reports use timm's `transforms_imagenet_eval` (resize, centre crop) returning uint8
images; `normalize` turns any uint8 batch into the model's float input on the device (4x less data
through the loader's queues than float32 images).
"""
from __future__ import annotations

import functools

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms_factory import transforms_imagenet_eval

MEAN = IMAGENET_DEFAULT_MEAN
STD = IMAGENET_DEFAULT_STD


def eval_transform(res: int | tuple[int, int], crop_pct: float, interpolation: str = "bicubic",
                   crop_mode: str = "squash", mean: tuple = MEAN, std: tuple = STD):
    """timm's eval transform (resize, centre crop): PIL image -> uint8 (3, S, S) tensor."""
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
    """uint8 (n, H, W, 3) images (a Batch's, on their device) -> the model's float (n, 3, H, W)
    input, normalised with `mean` / `std` (0..1 units). The NHWC images are channels-last memory
    already: `channels_last` keeps that layout, else the result is made contiguous NCHW."""
    m, s = _mean_std(images.device, tuple(mean), tuple(std))
    x = images.permute(0, 3, 1, 2).float().sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)
