"""Crops resized on the device, batched: PIL's resampling as matrix products (`loader.decode:
device`).

Resizing is linear, so PIL's resize of a crop is `Wy @ crop @ Wx.T` with one matrix per axis whose
rows hold the weights PIL's Resample.c gives the source pixels (bicubic a = -0.5 or triangle
kernel, stretched by the scale when downscaling: antialiased; normalised over the crop, which
also handles the crop's edges as PIL does). The weights are built on the device for every image
at once; a flip reverses the rows of Wx. Decoded images differ in size: they are zero-padded into
one batch (zeros get no weight), in chunks of similar sizes to bound the memory. As PIL does, the
horizontal pass runs first and its result is rounded to whole grey levels. On CUDA the products
run on tensor cores: float16 pixels (whole grey levels are exact) times float32 weights split in
a float16 head and tail, float32 accumulation and output (as exact as float32 on the CPU).

Against the CPU path (PIL bicubic, antialiased when downscaling), on the same decoded photo and
boxes (tests/test_examples.py): 0.0005-0.02 grey levels mean absolute difference, whole-level
rounding (up to 0.25 on the crops where this machine's Pillow build resizes vertically first).
Alternatives measured the same way: torch's per-image antialiased bicubic `interpolate` (one kernel
per image) 0.15; `torchvision.ops.roi_align` (a box filter when downscaling) 1.5-1.7.
"""
from __future__ import annotations

import functools
import warnings

import torch

# padded images per chunk of the crop step, in pixels x channels: 256 MB of float16
PAD_BUDGET = 2**27
# bmm(float16, float16) -> float32 (torch >= 2.8 on CUDA); without it the crops run in float32
BMM_FP32_OUT = hasattr(torch.ops.aten.bmm, "dtype")
# torch.nested (the padding of differently sized images in one kernel) warns it is a prototype
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors", category=UserWarning)


def crop_flip(images: list[torch.Tensor], crops: list[tuple[int, int, int, int, bool]], res: int,
              interpolation: str) -> torch.Tensor:
    """Each uint8 (3, H, W) image's crop (top, left, height, width, flip) resized to res x res and
    flipped where drawn: uint8 (n, res, res, 3) on the images' device."""
    dev = images[0].device if images else torch.device("cpu")
    dtype = torch.float16 if dev.type == "cuda" and BMM_FP32_OUT else torch.float32
    out = torch.empty(len(images), 3, res, res, dtype=torch.uint8, device=dev)
    boxes = torch.tensor([(t, le, h, w, int(f)) for t, le, h, w, f in crops],
                         dtype=torch.long).to(dev, non_blocking=True)
    for chunk in _chunks([(img.shape[-2], img.shape[-1]) for img in images]):
        x = _padded([images[i] for i in chunk], dtype)                    # (k, 3, H, W)
        k, _, h, w = x.shape
        idx = torch.tensor(chunk).to(dev, non_blocking=True)
        box = boxes.index_select(0, idx)
        wx = resample_weights(box[:, 1], box[:, 3], w, res, interpolation)
        wx = torch.where(box[:, 4, None, None].bool(), wx.flip(1), wx)   # flip: columns reversed
        wy = resample_weights(box[:, 0], box[:, 2], h, res, interpolation)
        rows = _weigh(x.view(k, 3 * h, w), wx.transpose(1, 2), weights_first=False)
        rows = rows.round_().clamp_(0, 255).to(dtype)                   # PIL: 8 bits between
        rows = rows.view(k, 3, h, res).transpose(1, 2).reshape(k, h, 3 * res)
        y = _weigh(rows, wy, weights_first=True).view(k, res, 3, res).transpose(1, 2)
        out.index_copy_(0, idx, y.round_().clamp_(0, 255).to(torch.uint8))
    return out.permute(0, 2, 3, 1).contiguous()


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
    chunks: list[list[int]] = []
    current: list[int] = []
    hmax, wmax = 0, 0
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


