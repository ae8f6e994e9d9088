"""Decode and augment on the training device: nvJPEG decode, then batched crops, flips and
RandAugment on the GPU (`loader.decode: device`).

Why: timm's CPU path (PIL decode + RandAugment) runs ~310 images/s per core at 192 px, so 16 cores
cannot feed an H100 training F0 at 5,000 images/s (../shared/gpu/README.md); nvJPEG decodes
~18,000 images/s on the same GPU. Dataloader workers then only read tar bytes.

Same augmentation as the CPU path, not just the same distribution: the random parameters of every
sample (crop box, flip, RandAugment ops and signs) are drawn with timm's own code from the same
per-sample seed as `reader.TrainStreams` uses, so a sample gets the same crop, flip and ops on
either path (tests/test_device_aug.py). Pixels differ slightly: torch's antialiased bicubic
resize and grid_sample instead of PIL's.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.transforms import MEAN, randaugment_spec
from pipeline.recipe import AugmentSection


@dataclass
class SampleParams:
    box: tuple[int, int, int, int]            # top, left, height, width in the decoded image
    flip: bool
    ops: list[tuple[str, tuple]]              # RandAugment (op name, args), in order


class DeviceAugment:
    """uint8 JPEG bytes + per-sample seeds -> augmented uint8 (B, 3, S, S) on `device`."""

    def __init__(self, res: int, augment: AugmentSection, device: torch.device):
        self.res, self.device = res, torch.device(device)
        self.hflip = augment.hflip
        self.rrc = RandomResizedCropAndInterpolation(res, scale=tuple(augment.crop_scale),
                                                     ratio=(3 / 4, 4 / 3))
        spec = randaugment_spec(augment.randaugment_layers, augment.randaugment_magnitude)
        # the hyper-parameters timm's create_transform passes (train_transform builds the same)
        hp = dict(translate_const=int(res * 0.45),
                  img_mean=tuple(min(255, round(255 * m)) for m in MEAN))
        self.ra = rand_augment_transform(spec, hp) if spec else None
        self.fill = torch.tensor(hp["img_mean"], dtype=torch.float32, device=self.device)

    def params(self, seed: int, height: int, width: int) -> SampleParams:
        """The random parameters of one sample, drawn exactly as the CPU transform draws them
        (crop, flip, and the RandAugment ops that follow them when RA runs before mixing)."""
        saved = random.getstate()
        try:
            random.seed(seed)                         # timm's crop and RA signs use `random`
            shape_only = torch.empty(3, height, width, device="meta")   # timm reads only the size
            top, left, h, w = self.rrc.get_params(shape_only, self.rrc.scale, self.rrc.ratio)
            flip = self.hflip and bool(torch.rand(1, generator=torch.Generator().manual_seed(seed)) < 0.5)
            ops = self._draw_ops(seed)
        finally:
            random.setstate(saved)
        return SampleParams((top, left, h, w), flip, ops)

    def example_ops(self, seed: int) -> list[tuple[str, tuple]]:
        """The RandAugment ops of a mixed example (RA after mixing), drawn as the CPU worker
        draws them: every generator freshly seeded with the example's seed."""
        saved = random.getstate()
        try:
            random.seed(seed)
            return self._draw_ops(seed)
        finally:
            random.setstate(saved)

    def _draw_ops(self, seed: int) -> list[tuple[str, tuple]]:
        ops = []
        if self.ra is not None:                      # timm's RandAugment uses np.random.choice
            for op in np.random.RandomState(seed).choice(self.ra.ops, self.ra.num_layers, replace=True):
                m = max(0.0, min(op.magnitude, op.magnitude_max or 10.0))
                ops.append((op.name, op.level_fn(m, op.hparams) if op.level_fn else ()))
        return ops

    def __call__(self, jpeg: torch.Tensor, offsets: torch.Tensor, seeds: list[int],
                 randaugment: bool = True) -> torch.Tensor:
        """Decode, crop, flip (and, with `randaugment`, the per-image RA ops) on the device."""
        data = [jpeg[offsets[i]:offsets[i + 1]] for i in range(len(seeds))]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        params = [self.params(s, img.shape[-2], img.shape[-1]) for s, img in zip(seeds, images)]
        out = torch.empty(len(images), 3, self.res, self.res, dtype=torch.uint8, device=self.device)
        for i, (img, p) in enumerate(zip(images, params)):
            top, left, h, w = p.box
            crop = img[None, :, top:top + h, left:left + w].float()
            x = F.interpolate(crop, size=(self.res, self.res), mode="bicubic", align_corners=False,
                              antialias=True)
            out[i] = x[0].round_().clamp_(0, 255).to(torch.uint8)
        flips = [i for i, p in enumerate(params) if p.flip]
        if flips:
            out[flips] = out[flips].flip(-1)
        return self.apply_ops(out, [p.ops for p in params]) if randaugment else out

    def apply_ops(self, images: torch.Tensor, ops: list[list[tuple[str, tuple]]]) -> torch.Tensor:
        """RandAugment: each image's op sequence, batched over the images sharing an op."""
        out = images
        for layer in range(max((len(o) for o in ops), default=0)):
            groups: dict[tuple, list[int]] = {}
            for i, o in enumerate(ops):
                groups.setdefault(o[layer], []).append(i)
            for (name, args), idx in groups.items():
                out[idx] = self._apply(name, args, out[idx])
        return out

    # --------------------------------------------------------------------------------------
    # timm's RandAugment ops on uint8 (n, 3, H, W) batches, with PIL's semantics
    # --------------------------------------------------------------------------------------
    def _apply(self, name: str, args: tuple, x: torch.Tensor) -> torch.Tensor:
        if name == "AutoContrast":
            return TF.autocontrast(x)
        if name == "Equalize":
            return TF.equalize(x)
        if name == "Invert":
            return TF.invert(x)
        if name == "Posterize":
            return x if args[0] >= 8 else TF.posterize(x, int(args[0]))
        if name == "Solarize":
            return TF.solarize(x, float(args[0])) if args[0] < 256 else x
        if name == "SolarizeAdd":
            add = int(args[0])
            return torch.where(x < 128, (x.int() + add).clamp(max=255).to(torch.uint8), x)
        if name == "Color":
            return TF.adjust_saturation(x, args[0])
        if name == "Contrast":
            return TF.adjust_contrast(x, args[0])
        if name == "Brightness":
            return TF.adjust_brightness(x, args[0])
        if name == "Sharpness":
            return TF.adjust_sharpness(x, args[0])
        h, w = x.shape[-2:]
        if name == "Rotate":
            a = -math.radians(args[0])             # PIL's Image.rotate, about the centre
            cx, cy = w / 2.0, h / 2.0
            m = (math.cos(a), math.sin(a), 0.0, -math.sin(a), math.cos(a), 0.0)
            c = cx - (m[0] * cx + m[1] * cy)
            f = cy - (m[3] * cx + m[4] * cy)
            return self._affine(x, (m[0], m[1], c, m[3], m[4], f))
        if name == "ShearX":
            return self._affine(x, (1, args[0], 0, 0, 1, 0))
        if name == "ShearY":
            return self._affine(x, (1, 0, 0, args[0], 1, 0))
        if name == "TranslateXRel":
            return self._affine(x, (1, 0, args[0] * w, 0, 1, 0))
        if name == "TranslateYRel":
            return self._affine(x, (1, 0, 0, 0, 1, args[0] * h))
        if name == "TranslateX":
            return self._affine(x, (1, 0, args[0], 0, 1, 0))
        if name == "TranslateY":
            return self._affine(x, (1, 0, 0, 0, 1, args[0]))
        raise ValueError(f"RandAugment op {name} has no device implementation")

    def _affine(self, x: torch.Tensor, m: tuple) -> torch.Tensor:
        """PIL's Image.transform(AFFINE, m): output pixel (x, y) reads input (a x + b y + c,
        d x + e y + f); outside the image it is the fill colour (the ImageNet mean)."""
        n, _, h, w = x.shape
        a, b, c, d, e, f = (float(v) for v in m)
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=x.device, dtype=torch.float32) + 0.5,
                                indexing="ij")
        src_x, src_y = a * xs + b * ys + c, d * xs + e * ys + f
        grid = torch.stack([src_x / w * 2 - 1, src_y / h * 2 - 1], dim=-1).expand(n, h, w, 2)
        xf = torch.cat([x.float(), torch.ones(n, 1, h, w, device=x.device)], dim=1)
        y = F.grid_sample(xf, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
        inside = y[:, 3:4].clamp(0, 1)
        out = y[:, :3] + (1 - inside) * self.fill.view(1, 3, 1, 1)
        return out.round_().clamp_(0, 255).to(torch.uint8)
