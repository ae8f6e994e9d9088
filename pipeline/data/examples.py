"""How a training example is made: decode -> crop + flip -> mix -> RandAugment -> uint8 tensor.

    for every image read:   decode the JPEG                 PIL (CPU)       | nvJPEG (device)
                            crop (Inception-style) + flip   PIL resize      | resize.crop_flip
    for every example:      mix image a with image b        mixing.mix_into | mixing.mix
                            RandAugment                     randaugment.apply_cpu | apply_batch
    out:                    uint8 (n, H, W, 3) in a Batch   (the step normalises on the device)

Every random choice is drawn in the loader worker, by the same functions for both paths
(`draw_image`, `draw`), from generators seeded by the samples themselves: an image's crop, flip
(and RandAugment before mixing) from its own seed (reader.sample_seed: seed, epoch, order index);
an example's mixing and RandAugment from a seed derived from its image a's. Whether an example is
MixUp or CutMix follows its place in its stream (mixing.is_cutmix). So an example is the same
whichever worker, process or resume makes it, and on either path: the device path differs only
by the JPEG decoder and the resize kernels (0.01 grey levels on average on the CPU, where both
decode with libjpeg-turbo: tests/test_examples.py). The operations themselves are defined once
(mixing.py, randaugment.py); each path applies them its way: one example at a time with numpy and
PIL in a CPU worker, a whole micro-batch with torch gathers on the device.

The CPU path (`loader.decode: cpu`): `image_cpu` per image as it is read (decoded down to its
crop's last row only, samples.open_rows, and cropped at once, while its pixels are in the cache),
then `build_cpu` per fetch, writing each example straight into the batch. The device path
(`decode: device`): the worker passes the JPEG bytes and the draws (`batch.Encoded`);
`build_device` makes the same examples on the GPU for a whole micro-batch, off the step's
critical path (pipeline/data/prefetch.py).

Order: crop and flip per image, then mixing, then RandAugment on each mixed example (DeepMind's
`augment_before_mix=False`, `augment.randaugment_order: after_mix`), or RandAugment per image
before mixing (`before_mix`, timm's order). `augment.randaugment_ops: deepmind` runs DeepMind's
operations (pipeline/data/randaugment.py); `timm` runs timm's `rand_augment_transform` (CPU
path only), for users who want timm's.

The crop is torchvision's RandomResizedCrop as timm draws it (10 tries of a scale and a
log-uniform aspect ratio, else a centre crop), drawn from the image's own `random.Random`:
the same boxes as timm's transform given the same seed, with no global generator touched (a
prefetch thread draws beside the training thread).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from pipeline.data import randaugment as ra
from pipeline.data.batch import Batch, Encoded, batch_buffer
from pipeline.data.mixing import (
    MixDraw,
    draw_mix,
    images_per_example,
    is_cutmix,
    mix,
    mix_into,
    mixing_on,
    partners,
)
from pipeline.data.resize import crop_flip
from pipeline.data.samples import decode, open_rows
from pipeline.recipe import AugmentSection

PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
ASPECT = (3 / 4, 4 / 3)
EXAMPLE_SEED_OFFSET = 2**32       # an example's generator: its image a's seed + this (image seeds < 2^31)


@dataclass(frozen=True)
class ExampleRecipe:
    """What the recipe's `augment` section asks of every example, at resolution `res`."""
    res: int
    crop_scale: tuple[float, float]
    hflip: bool
    interpolation: str
    pairs: str
    mixup_alpha: float
    cutmix_alpha: float
    ra_layers: int
    ra_magnitude: int
    ra_ops: str                      # deepmind | timm
    ra_order: str                    # after_mix | before_mix

    @classmethod
    def of(cls, res: int, augment: AugmentSection) -> ExampleRecipe:
        return cls(res, tuple(augment.crop_scale), augment.hflip, augment.interpolation,
                   augment.mix_pairs, augment.mixup_alpha, augment.cutmix_alpha,
                   augment.randaugment_layers, augment.randaugment_magnitude,
                   augment.randaugment_ops, augment.randaugment_order)

    @property
    def mixing(self) -> bool:
        return mixing_on(self.mixup_alpha, self.cutmix_alpha)

    @property
    def images_per_example(self) -> int:
        return images_per_example(self.pairs, self.mixup_alpha, self.cutmix_alpha)

    @property
    def ra_after_mix(self) -> bool:
        """RandAugment runs on mixed examples (else on each image, before any mixing)."""
        return self.ra_layers > 0 and self.mixing and self.ra_order == "after_mix"


class SampleInfo(NamedTuple):
    """What the draws need to know of a sample besides its pixels."""
    seed: int                # reader.sample_seed(seed, epoch, order index)
    stream: int              # the stream that read it
    position: int            # its place in the stream's share of the epoch


class ImageDraw(NamedTuple):
    """One image's random choices: its crop (top, left, height, width) and flip, and its
    RandAugment when that runs before mixing (DeepMind's ops, or a seed for timm's)."""
    crop: tuple[int, int, int, int, bool]
    ops: list[ra.Op]
    timm_seed: int | None


@dataclass
class Draws:
    """Every random choice of a fetch: per image its crop and flip; per example its two images,
    its mixing and its RandAugment (per image instead, when RandAugment runs before mixing)."""
    crops: list[tuple[int, int, int, int, bool]]    # top, left, height, width, flip
    pairs: list[tuple[int, int]]                     # image a, image b (a, a when unmixed)
    mixes: list[MixDraw] | None                      # None: no mixing
    ops: list[list[ra.Op]]                           # DeepMind's RandAugment, per example/image
    timm_seeds: list[int]                            # timm's RandAugment: a seed per example/image

    @staticmethod
    def concat(parts: list[Draws], images: list[int]) -> Draws:
        """The draws of fetches laid end to end (`images`: each fetch's image count)."""
        starts = np.concatenate([[0], np.cumsum(images)[:-1]]).tolist()
        return Draws([c for p in parts for c in p.crops],
                     [(a + s, b + s) for p, s in zip(parts, starts) for a, b in p.pairs],
                     None if parts[0].mixes is None else [m for p in parts for m in p.mixes],
                     [o for p in parts for o in p.ops], [t for p in parts for t in p.timm_seeds])

    def ratio(self) -> torch.Tensor:
        if self.mixes is None:
            return torch.ones(len(self.pairs))
        return torch.tensor([m.ratio for m in self.mixes], dtype=torch.float32)


def inception_crop(rng: random.Random, height: int, width: int, scale: tuple[float, float]
                   ) -> tuple[int, int, int, int]:
    """(top, left, height, width): torchvision's RandomResizedCrop.get_params as timm runs it,
    on `rng`."""
    area = width * height
    log_ratio = (math.log(ASPECT[0]), math.log(ASPECT[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height                          # ten misses: the centre, aspect clamped
    if ratio < ASPECT[0]:
        w, h = width, int(round(width / ASPECT[0]))
    elif ratio > ASPECT[1]:
        h, w = height, int(round(height * ASPECT[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_image(recipe: ExampleRecipe, seed: int, height: int, width: int) -> ImageDraw:
    """An image's crop and flip (and RandAugment before mixing) from its own seed."""
    rng = random.Random(seed)
    top, left, h, w = inception_crop(rng, height, width, recipe.crop_scale)
    crop = (top, left, h, w, recipe.hflip and rng.random() < 0.5)
    if recipe.ra_layers == 0 or recipe.ra_after_mix:
        return ImageDraw(crop, [], None)
    return ImageDraw(crop, *_draw_randaugment(recipe, rng))


def _draw_randaugment(recipe: ExampleRecipe, rng: random.Random) -> tuple[list[ra.Op], int | None]:
    if recipe.ra_ops == "deepmind":
        return ra.draw_ops(rng, recipe.ra_layers, recipe.ra_magnitude, (recipe.res, recipe.res)), None
    return [], rng.getrandbits(31)


def draw(recipe: ExampleRecipe, samples: list[SampleInfo], images: list[ImageDraw],
         per_stream: int) -> Draws:
    """All random choices of a fetch whose images (stream by stream, `per_stream` each) drew
    `images`: the examples' pairs, kinds, ratios or boxes, and RandAugment after mixing."""
    crops = [d.crop for d in images]
    ops, timm_seeds = [d.ops for d in images], [d.timm_seed for d in images]
    if not recipe.mixing:
        return Draws(crops, [(i, i) for i in range(len(samples))], None, ops, timm_seeds)
    pairs = [(c + a, c + b) for c in range(0, len(samples), per_stream)
             for a, b in partners(recipe.pairs, per_stream)]
    ipe, mixes = recipe.images_per_example, []
    if recipe.ra_after_mix:
        ops, timm_seeds = [], []
    for a, _ in pairs:
        rng = random.Random(samples[a].seed + EXAMPLE_SEED_OFFSET)
        cut = is_cutmix(samples[a].stream, samples[a].position // ipe, recipe.mixup_alpha,
                        recipe.cutmix_alpha)
        mixes.append(draw_mix(rng, cut, recipe.mixup_alpha, recipe.cutmix_alpha,
                              (recipe.res, recipe.res)))
        if recipe.ra_after_mix:
            example_ops, timm_seed = _draw_randaugment(recipe, rng)
            ops.append(example_ops)
            timm_seeds.append(timm_seed)
    return Draws(crops, pairs, mixes, ops, timm_seeds)


# ------------------------------------------------------------------------------------------------
# The CPU path: one fetch in a loader worker
# ------------------------------------------------------------------------------------------------

def image_cpu(recipe: ExampleRecipe, data: bytes, d: ImageDraw) -> np.ndarray:
    """One image's bytes made ready to mix: decoded (only down to its crop's last row, as
    samples.open_rows does), cropped, resized, flipped (and RandAugmented when that runs before
    mixing): uint8 (res, res, 3). One image at a time, so its decoded pixels are still in the
    cache when they are cropped."""
    top, left, h, w, flip = d.crop
    img = decode(open_rows(data, top + h))
    if img.width < left + w or img.height < top + h:    # PIL would pad the crop with black
        raise ValueError(f"the image decodes to {img.width} x {img.height} px, smaller than its "
                         f"header says")
    out = img.crop((left, top, left + w, top + h)).resize(
        (recipe.res, recipe.res), PIL_RESAMPLE[recipe.interpolation])
    if flip:      # in PIL: a flipped numpy view would make every later copy 10x slower
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(out)
    if d.ops:
        return ra.apply_cpu(x, d.ops)
    if d.timm_seed is not None:
        return _timm_randaugment_cpu(recipe, x, d.timm_seed)
    return x


def build_cpu(recipe: ExampleRecipe, images: list[np.ndarray], draws: Draws) -> torch.Tensor:
    """The fetch's examples, uint8 (n, res, res, 3), from its prepared images (`image_cpu`):
    each example mixed and RandAugmented straight into the batch."""
    batch = batch_buffer((len(draws.pairs), recipe.res, recipe.res, 3))
    out = batch.numpy()
    for i, (a, b) in enumerate(draws.pairs):
        if draws.mixes is None:
            out[i] = images[a]
            continue
        mix_into(out[i], images[a], images[b], draws.mixes[i])
        if recipe.ra_after_mix and recipe.ra_ops == "deepmind":
            out[i] = ra.apply_cpu(out[i], draws.ops[i])
        elif recipe.ra_after_mix:
            out[i] = _timm_randaugment_cpu(recipe, out[i], draws.timm_seeds[i])
    return batch


def _timm_randaugment_cpu(recipe: ExampleRecipe, x: np.ndarray, seed: int) -> np.ndarray:
    random.seed(seed)                      # timm's transform draws from the global generators
    np.random.seed(seed)
    return np.asarray(_timm_randaugment(recipe.res, recipe.ra_layers, recipe.ra_magnitude)(
        Image.fromarray(np.ascontiguousarray(x))))


_TIMM: dict[tuple[int, int, int], object] = {}


def _timm_randaugment(res: int, layers: int, magnitude: int):
    """timm's RandAugment as timm's create_transform builds it, every chosen op applied and
    magnitudes up to the recipe's (DeepMind's settings for what timm lets us set)."""
    key = (res, layers, magnitude)
    if key not in _TIMM:
        from timm.data import IMAGENET_DEFAULT_MEAN
        from timm.data.auto_augment import rand_augment_transform
        spec = f"rand-m{magnitude}-n{layers}-mmax{max(10, magnitude)}-p1.0"
        hp = dict(translate_const=int(res * 0.45),
                  img_mean=tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN))
        _TIMM[key] = rand_augment_transform(spec, hp)
    return _TIMM[key]


# ------------------------------------------------------------------------------------------------
# The device path: a micro-batch on the GPU
# ------------------------------------------------------------------------------------------------

def build_device(recipe: ExampleRecipe, encoded: Encoded, device: torch.device) -> Batch:
    """The same examples as `build_cpu`, made on `device` from the JPEG bytes and the draws:
    nvJPEG decode (CUDA; libjpeg-turbo on the CPU), batched crops, mixing and RandAugment."""
    from torchvision.io import ImageReadMode, decode_jpeg
    d = encoded.draws
    bounds = encoded.offsets.tolist()
    files = [encoded.jpeg[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    x = crop_flip(images, d.crops, recipe.res, recipe.interpolation)   # (k, S, S, 3)
    if recipe.ra_layers > 0 and not recipe.ra_after_mix:
        x = ra.apply_batch(x, d.ops)
    if d.mixes is not None:
        a = torch.tensor([i for i, _ in d.pairs]).to(device, non_blocking=True)
        b = torch.tensor([j for _, j in d.pairs]).to(device, non_blocking=True)
        x = mix(x.index_select(0, a), x.index_select(0, b), d.mixes)
        if recipe.ra_after_mix:
            x = ra.apply_batch(x, d.ops)
    batch = encoded.batch
    return Batch(x, batch.labels, batch.labels_b, batch.ratio, batch.keys, batch.index,
                 batch.bad, batch.notes)
