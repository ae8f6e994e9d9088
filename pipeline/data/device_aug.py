"""Decode and augment on the training device: nvJPEG decode, then batched crops, flips and
RandAugment on the GPU (`loader.decode: device`).

Why: timm's CPU path (PIL decode + RandAugment) runs ~310 images/s per core at 192 px, so 16 cores
cannot feed an H100 training F0 at 5,000 images/s (../shared/gpu/README.md); nvJPEG decodes
~18,000 images/s on the same GPU. Dataloader workers then only read tar bytes.

Same augmentation as the CPU path, not just the same distribution: the random parameters of every
sample (crop box, flip, RandAugment ops and signs) are drawn with timm's own code from the same
per-sample seed as `reader.TrainStreams` uses, so a sample gets the same crop, flip and ops on
either path (tests/test_device_aug.py). The draws use private generators seeded exactly as the CPU
worker seeds the process-wide ones, so they are the same numbers, and a prefetch thread
(pipeline/data/prefetch.py) can draw while the step runs without touching global random state.

Crops: all images of a batch are resized in two batched matrix products, no kernel per image.
Resizing is linear, so PIL's resize of a crop is `Wy @ crop @ Wx.T` with one matrix per axis whose
rows hold the weights PIL's Resample.c gives the source pixels (bicubic a = -0.5 or triangle
kernel, stretched by the scale when downscaling: antialiased; normalised over the crop, which
also handles the crop's edges as PIL does). The weights are built on the device for every image
at once; a flip reverses the rows of Wx. Decoded images differ in size: they are zero-padded into
one batch (zeros get no weight), in chunks of similar sizes to bound the memory. As PIL does, the
horizontal pass runs first and its result is rounded to whole grey levels. On CUDA the products
run on tensor cores: float16 pixels (whole grey levels are exact) times float32 weights split in
a float16 head and tail, float32 accumulation and output (as exact as float32 on the CPU).

Interpolation against the CPU path (PIL bicubic, antialiased when downscaling), on the same
decoded photo and boxes (tests/test_device_aug.py): 0.0005-0.02 grey levels mean absolute
difference, whole-level rounding (up to 0.25 on the crops where this machine's Pillow build
resizes vertically first). Alternatives measured the same way: torch's per-image antialiased
bicubic `interpolate` (the previous code, one kernel per image) 0.15; `torchvision.ops.roi_align`
(bilinear samples averaged over each output pixel: a box filter when downscaling, bilinear when
upscaling) 1.5-1.7. The device path as a whole still differs from the CPU path by the JPEG decoder
(nvJPEG vs libjpeg-turbo) and by RandAugment's kernels (torch vs PIL; geometric ops interpolate
bicubic with grid_sample): 0.37 grey levels on the mixed examples of tests/test_mixing.py.

Crops and RandAugment never make the host wait for the GPU: index tensors reach the device with
non-blocking copies (indexing a CUDA tensor with a Python list copies it with a stream sync), so
the host queues the next work while the GPU runs. nvJPEG's decode does block its calling thread
until the decode ends: pipeline/data/prefetch.py runs it in a thread of its own.
"""
from __future__ import annotations

import functools
import math
import random
import threading
import types
import warnings
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

# padded images per chunk of the crop step, in pixels x channels: 256 MB of float16
PAD_BUDGET = 2**27
# bmm(float16, float16) -> float32 (torch >= 2.8 on CUDA); without it the crops run in float32
BMM_FP32_OUT = hasattr(torch.ops.aten.bmm, "dtype")
# torch.nested (the padding of differently sized images in one kernel) warns it is a prototype
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors", category=UserWarning)


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
        self.interpolation = augment.interpolation
        self.ra_after_mix = augment.randaugment_order == "after_mix"
        self.rrc = RandomResizedCropAndInterpolation(res, scale=tuple(augment.crop_scale),
                                                     ratio=(3 / 4, 4 / 3))
        spec = randaugment_spec(augment.randaugment_layers, augment.randaugment_magnitude)
        # the hyper-parameters timm's create_transform passes (train_transform builds the same)
        hp = dict(translate_const=int(res * 0.45),
                  img_mean=tuple(min(255, round(255 * m)) for m in MEAN))
        self.ra = rand_augment_transform(spec, hp) if spec else None
        self.fill = torch.tensor(hp["img_mean"], dtype=torch.float32, device=self.device)
        self._draws = _Draws(self.rrc, self.ra)

    def params(self, seed: int, height: int, width: int, with_ops: bool = True) -> SampleParams:
        """The random parameters of one sample, drawn exactly as the CPU transform draws them
        (crop, flip, and the RandAugment ops that follow them when RA runs before mixing)."""
        return self._draws.sample(seed, height, width, self.hflip, with_ops)

    def example_ops(self, seed: int) -> list[tuple[str, tuple]]:
        """The RandAugment ops of a mixed example (RA after mixing), drawn as the CPU worker
        draws them: every generator freshly seeded with the example's seed."""
        return self._draws.example_ops(seed)

    def __call__(self, jpeg: torch.Tensor, offsets: torch.Tensor, seeds: list[int],
                 randaugment: bool = True) -> torch.Tensor:
        """Decode, crop, flip (and, with `randaugment`, the per-image RA ops) on the device."""
        images = self.decode(jpeg, offsets)
        params = [self.params(s, img.shape[-2], img.shape[-1], with_ops=randaugment)
                  for s, img in zip(seeds, images)]
        out = self.crop_flip(images, params)
        return self.apply_ops(out, [p.ops for p in params])      # no ops without `randaugment`

    def decode(self, jpeg: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
        """The JPEGs packed in `jpeg` (reader.pack_jpegs) as uint8 (3, H, W) images on the device
        (nvJPEG on CUDA, in one batched call)."""
        bounds = offsets.tolist()
        data = [jpeg[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def crop_flip(self, images: list[torch.Tensor], params: list[SampleParams]) -> torch.Tensor:
        """Every image's crop box resized to res x res (PIL's resampling), flipped where drawn:
        two batched matrix products per chunk of similarly sized images."""
        dev, res = self.device, self.res
        dtype = torch.float16 if dev.type == "cuda" and BMM_FP32_OUT else torch.float32
        out = torch.empty(len(images), 3, res, res, dtype=torch.uint8, device=dev)
        boxes = _to_device(torch.tensor([(*p.box, p.flip) for p in params], dtype=torch.long), dev)
        for chunk in _chunks([tuple(img.shape[-2:]) for img in images]):
            x = _padded([images[i] for i in chunk], dtype)                    # (k, 3, H, W)
            k, _, h, w = x.shape
            idx = _to_device(torch.tensor(chunk), dev)
            box = boxes.index_select(0, idx)
            wx = resample_weights(box[:, 1], box[:, 3], w, res, self.interpolation)
            wx = torch.where(box[:, 4, None, None].bool(), wx.flip(1), wx)   # flip: columns reversed
            wy = resample_weights(box[:, 0], box[:, 2], h, res, self.interpolation)
            rows = _weigh(x.view(k, 3 * h, w), wx.transpose(1, 2), weights_first=False)
            rows = rows.round_().clamp_(0, 255).to(dtype)                   # PIL: 8 bits between
            rows = rows.view(k, 3, h, res).transpose(1, 2).reshape(k, h, 3 * res)
            y = _weigh(rows, wy, weights_first=True).view(k, res, 3, res).transpose(1, 2)
            out.index_copy_(0, idx, y.round_().clamp_(0, 255).to(torch.uint8))
        return out

    def apply_ops(self, images: torch.Tensor, ops: list[list[tuple[str, tuple]]]) -> torch.Tensor:
        """RandAugment: each image's op sequence, batched over the images sharing an op."""
        out = images
        layers = max((len(o) for o in ops), default=0)
        if not layers:
            return out
        # per layer: the images in group order, sent to the device once (no sync per group)
        groups = [_group(ops, layer) for layer in range(layers)]
        order = _to_device(torch.tensor([i for g in groups for idx in g.values() for i in idx]),
                           images.device)
        start = 0
        for g in groups:
            for (name, args), idx in g.items():
                sel = order[start:start + len(idx)]
                start += len(idx)
                out.index_copy_(0, sel, self._apply(name, args, out.index_select(0, sel)))
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


# ------------------------------------------------------------------------------------------------
# The random draws: timm's code on private generators
# ------------------------------------------------------------------------------------------------

class _Draws:
    """timm's crop and RandAugment draws for one seed. The CPU worker seeds the process-wide
    `random`, `torch` and `numpy` generators with the sample's seed and runs timm's transforms;
    here timm's own functions run with `random` bound to a private `random.Random`, and numpy and
    torch draw from private generators, all seeded the same way: the same numbers, no global state
    touched (safe beside the step and the loader), no RandomState built per sample (300 us)."""

    def __init__(self, rrc: RandomResizedCropAndInterpolation, ra):
        self.rrc, self.ra = rrc, ra
        self.lock = threading.Lock()               # the prefetch thread and the step both draw
        self.random = random.Random()
        self.numpy = np.random.RandomState()
        self.torch = torch.Generator()
        self.crop_params = _with_random(rrc.get_params, self.random)
        self.level_fns = {op.name: _with_random(op.level_fn, self.random) if op.level_fn else None
                          for op in (ra.ops if ra is not None else [])}

    def sample(self, seed: int, height: int, width: int, hflip: bool, with_ops: bool) -> SampleParams:
        shape_only = torch.empty(3, height, width, device="meta")   # timm reads only the size
        with self.lock:
            self.random.seed(seed)                   # timm's crop and RA signs use `random`
            top, left, h, w = self.crop_params(shape_only, self.rrc.scale, self.rrc.ratio)
            # torchvision's RandomHorizontalFlip draws torch.rand(1) < p after the crop
            flip = hflip and torch.rand(1, generator=self.torch.manual_seed(seed)).item() < 0.5
            ops = self._ops(seed) if with_ops else []
        return SampleParams((top, left, h, w), flip, ops)

    def example_ops(self, seed: int) -> list[tuple[str, tuple]]:
        with self.lock:
            self.random.seed(seed)
            return self._ops(seed)

    def _ops(self, seed: int) -> list[tuple[str, tuple]]:
        """timm's RandAugment: np.random.choice of the ops, then each op's level -> args (which
        negates with `random`); every op applied (p1.0), magnitude without noise."""
        ops = []
        if self.ra is not None:
            self.numpy.seed(seed)
            # what legacy choice(ops, k, replace=True) draws (numpy keeps RandomState's stream
            # fixed), without its argument checks: a third of the cost of a sample's draws
            for i in self.numpy.randint(0, len(self.ra.ops), size=self.ra.num_layers):
                op = self.ra.ops[i]
                m = max(0.0, min(op.magnitude, op.magnitude_max or 10.0))
                fn = self.level_fns[op.name]
                ops.append((op.name, fn(m, op.hparams) if fn else ()))
        return ops


def _with_random(fn, rng: random.Random):
    """timm's function `fn`, its own code, with the global name `random` (and that of the helper
    `_randomly_negate` it may call, which draws too) bound to a private generator."""
    scope = dict(fn.__globals__, random=rng)
    helper = scope.get("_randomly_negate")
    if isinstance(helper, types.FunctionType):
        scope["_randomly_negate"] = _rebind(helper, scope)
    return _rebind(fn, scope)


def _rebind(fn, scope: dict):
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"{fn!r}: only plain functions can draw from a private generator")
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)


# ------------------------------------------------------------------------------------------------
# Batched resampling
# ------------------------------------------------------------------------------------------------

def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic_filter (a = -0.5), support 2."""
    a, t = -0.5, t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _triangle(t: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear_filter, support 1."""
    return (1 - t.abs()).clamp_(min=0)


KERNELS = {"bicubic": _bicubic, "bilinear": _triangle}


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, res: int,
                     interpolation: str) -> torch.Tensor:
    """(n, res, size) float32: row i of image k holds the weights PIL's resize gives the source
    pixels 0..size-1 for output pixel i when pixels [start_k, start_k + length_k) are resized to
    `res` (Resample.c: centre (i + 0.5) * scale; the kernel stretched by the scale when it
    downscales; weights normalised to sum 1 over the pixels inside the crop)."""
    dev = start.device
    scale = (length.float() / res)[:, None, None]
    stretch = scale.clamp(min=1.0)
    centre = start[:, None, None] + (torch.arange(res, device=dev)[None, :, None] + 0.5) * scale
    pixel = torch.arange(size, device=dev)[None, None, :]
    w = KERNELS[interpolation]((pixel + 0.5 - centre) / stretch)
    inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
    w = w * inside
    return w / w.sum(-1, keepdim=True)


def _weigh(pixels: torch.Tensor, weights: torch.Tensor, weights_first: bool) -> torch.Tensor:
    """weights @ pixels (or pixels @ weights) for batches of matrices, float32 out. With float16
    pixels (CUDA; whole grey levels are exact in float16) two tensor-core products with float32
    accumulation and output, the float32 weights split into a float16 head and tail: as exact as
    float32 (weights in float16 alone put 3% of the pixels a grey level off)."""
    def product(w: torch.Tensor) -> torch.Tensor:
        a, b = (w, pixels) if weights_first else (pixels, w)
        return torch.bmm(a, b, out_dtype=torch.float32) if a.dtype == torch.float16 else torch.bmm(a, b)
    if pixels.dtype != torch.float16:
        return product(weights)
    head = weights.half()
    return product(head) + product((weights - head.float()).half())


def _chunks(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Image indices in chunks whose zero-padded batch (k x 3 x max H x max W) stays within
    PAD_BUDGET (read at call time): all at once when they fit (the usual case), else by size,
    similar sizes together. One pass, with running maxima."""
    if not sizes:
        return []
    everything = list(range(len(sizes)))
    if 3 * len(sizes) * max(h for h, _ in sizes) * max(w for _, w in sizes) <= PAD_BUDGET:
        return [everything]
    chunks, current, hmax, wmax = [], [], 0, 0
    for i in sorted(everything, key=lambda i: (sizes[i][0] * sizes[i][1], i)):
        h, w = sizes[i]
        if current and 3 * (len(current) + 1) * max(hmax, h) * max(wmax, w) > PAD_BUDGET:
            chunks.append(current)
            current, hmax, wmax = [], 0, 0
        current.append(i)
        hmax, wmax = max(hmax, h), max(wmax, w)
    return chunks + [current]


def _padded(images: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Differently sized (3, H, W) images as one zero-padded (k, 3, max H, max W) batch: one
    concatenation and one padding kernel (torch.nested), not one copy per image."""
    if all(img.shape == images[0].shape for img in images):
        return torch.stack(images).to(dtype)
    try:
        return torch.nested.as_nested_tensor(images).to(dtype).to_padded_tensor(0.0)
    except (RuntimeError, NotImplementedError) as e:      # a torch whose nested tensors lack it
        _warn_once(f"torch.nested cannot pad these images ({e}); one copy per image instead")
    h, w = max(img.shape[1] for img in images), max(img.shape[2] for img in images)
    out = images[0].new_zeros((len(images), 3, h, w), dtype=dtype)
    for i, img in enumerate(images):
        out[i, :, :img.shape[1], :img.shape[2]] = img
    return out


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _group(ops: list[list[tuple[str, tuple]]], layer: int) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(ops):
        if layer < len(o):
            groups.setdefault(o[layer], []).append(i)
    return groups


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking: a host tensor's blocking copy would wait for everything queued on the stream
    return t.to(device, non_blocking=True)
