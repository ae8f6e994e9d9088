"""RandAugment as DeepMind's NFNet code defines it (nfnets/autoaugment.py,
`distort_image_with_randaugment`), on uint8 HWC images: every operation defined once here, applied
to one image at a time on the CPU (`apply_cpu`) and to a whole batch on the device (`apply_batch`).

Each of the `layers` picks one of 16 operations uniformly (with replacement) and always applies it,
at the recipe's magnitude m (DeepMind's levels: 5, 10 or 15 out of 10):

    operation     argument at magnitude m             what happens to the pixels
    AutoContrast  -                                   each channel stretched from its min..max to 0..255
    Equalize      -                                   each channel's histogram equalised (PIL's rule)
    Invert        -                                   255 - x
    Rotate        +-30 m/10 degrees                   about the centre, nearest neighbour, fill 128
    Posterize     int(4 m/10) bits kept               the low 8 - bits bits cleared
    Solarize      int(256 m/10) as uint8 (mod 256)    x < t ? x : 255 - x  (m = 10: t = 0, all inverted)
    Color         1.8 m/10 + 0.1                      blend(grey image, x, factor)
    Contrast      1.8 m/10 + 0.1                      blend(a grey of H W / 256 (sic), x, factor)
    Brightness    1.8 m/10 + 0.1                      blend(black, x, factor)
    Sharpness     1.8 m/10 + 0.1                      blend(3x3-smoothed x, border kept, x, factor)
    ShearX/Y      +-0.3 m/10                          nearest neighbour, fill 128
    TranslateX/Y  +-100 m/10 pixels                   nearest neighbour, fill 128
    Cutout        a 2 int(40 m/10) px square          at a uniform centre, clipped, fill 128
    SolarizeAdd   int(110 m/10) added where x < 128   clipped at 255

blend(d, x, f) is x when f == 1 (so at F0's magnitude 5 the four blends do nothing), else
d + f (x - d) in float32, clipped to 0..255 when f is outside (0, 1), then truncated to uint8.
Signs (+-) are drawn 50/50 at every application. Geometric operations map each output pixel to the
input pixel at (a x + b y + c, d x + e y + f) in float32, rounded half away from zero (TensorFlow's
nearest neighbour); outside the image the pixel is 128.

How they run: eight operations are per-channel lookup tables (`lut`); five read one input pixel
per output pixel (`source_map`, cached per argument and size); Color and Sharpness compute in
float32 (`color`, `sharpness`, torch functions used by both paths); Cutout fills a box. The CPU
applies tables and maps with numpy, one image at a time in the loader worker; the device builds
the same tables and maps for a whole batch and applies each kind with one gather per layer.

`layers`/`magnitude` come from the recipe (`augment.randaugment_layers`, `_magnitude`), the draws
from each example's own generator (pipeline/data/examples.py), so a given example gets the same
operations on either path, in any worker, after any resume.
"""
from __future__ import annotations

import functools
import math
import random
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
       "Cutout", "SolarizeAdd")           # DeepMind's order: op i is drawn as uniform int i
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
TABLES = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
          "Contrast", "Brightness")
HISTOGRAM = ("AutoContrast", "Equalize")       # tables that depend on the image's histogram
FILL = 128                                # DeepMind's replace value, every channel
MAX_LEVEL = 10.0


class Op(NamedTuple):
    """One drawn operation: its name, its argument (signed where drawn), and for Cutout the
    box (top, bottom, left, right) it fills."""
    name: str
    arg: float = 0.0
    box: tuple[int, int, int, int] | None = None


def level_arg(name: str, magnitude: float) -> float:
    """DeepMind's `level_to_arg` (translate_const 100, cutout_const 40), before any sign."""
    level = magnitude / MAX_LEVEL
    if name == "Rotate":
        return level * 30.0
    if name in ("ShearX", "ShearY"):
        return level * 0.3
    if name in ("TranslateX", "TranslateY"):
        return level * 100.0
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name == "Posterize":
        return float(int(level * 4))
    if name == "Solarize":
        return float(int(level * 256))
    if name == "SolarizeAdd":
        return float(int(level * 110))
    if name == "Cutout":
        return float(int(level * 40))
    return 0.0


def draw_ops(rng: random.Random, layers: int, magnitude: float, size: tuple[int, int]) -> list[Op]:
    """The operations of one image or example: per layer an op, its sign, Cutout's centre."""
    ops = []
    h, w = size
    for _ in range(layers):
        name = OPS[rng.randrange(len(OPS))]
        arg = level_arg(name, magnitude)
        box = None
        if name in SIGNED and rng.random() < 0.5:
            arg = -arg
        elif name == "Cutout":
            pad, cy, cx = int(arg), rng.randrange(h), rng.randrange(w)
            box = (max(0, cy - pad), min(h, cy + pad), max(0, cx - pad), min(w, cx + pad))
        ops.append(Op(name, arg, box))
    return ops


# ------------------------------------------------------------------------------------------------
# Definitions shared by both paths
# ------------------------------------------------------------------------------------------------

def _blend_table(degenerate: float, factor: float) -> np.ndarray:
    """blend(d, x, f) for x = 0..255 with a constant d: the table of Brightness and Contrast."""
    x = np.arange(256, dtype=np.float32)
    d = np.float32(degenerate)
    out = d + np.float32(factor) * (x - d)
    if not 0.0 < factor < 1.0:
        out = np.clip(out, 0.0, 255.0)
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=64)
def fixed_table(name: str, arg: float, pixels: int) -> np.ndarray:
    """(256,) uint8: the table of an operation that does not look at the image (`pixels`: H x W,
    which Contrast's grey depends on)."""
    x = np.arange(256, dtype=np.int64)
    if name == "Invert":
        out = 255 - x
    elif name == "Posterize":
        # TensorFlow takes the shift as uint8 and clamps it to 0..7: 0 bits keep 1, 8 keep all,
        # 9 or more (8 - bits wraps to 255) keep 1 again
        shift = min((8 - int(arg)) % 256, 7)
        out = (x >> shift) << shift
    elif name == "Solarize":
        threshold = int(arg) % 256                 # a Python int against uint8 wraps (see above)
        out = np.where(x < threshold, x, 255 - x)
    elif name == "SolarizeAdd":
        out = np.where(x < 128, np.clip(x + int(arg), 0, 255), x)
    elif name == "Brightness":
        return _blend_table(0.0, arg) if arg != 1.0 else x.astype(np.uint8)
    elif name == "Contrast":
        grey = min(255, int(np.float32(pixels) / np.float32(256.0)))   # sum(histogram) / 256
        return _blend_table(float(grey), arg) if arg != 1.0 else x.astype(np.uint8)
    else:
        raise ValueError(f"{name} has no fixed table")
    return out.astype(np.uint8)


def histogram_tables(name: str, hist: np.ndarray) -> np.ndarray:
    """(n, 3, 256) uint8 tables of AutoContrast or Equalize from per-channel histograms
    (n, 3, 256) of int64 counts. numpy on both paths: a table is 256 numbers, and torch's
    per-call overhead made this the costliest part of a CPU example (400 vs 40 us)."""
    levels = np.arange(256)
    present = hist > 0
    lo = present.argmax(-1)[..., None]                                  # first non-empty level
    hi = 255 - present[..., ::-1].argmax(-1)[..., None]                 # last non-empty level
    if name == "AutoContrast":
        lo_f, hi_f = lo.astype(np.float32), hi.astype(np.float32)
        scale = np.float32(255.0) / np.maximum(hi_f - lo_f, np.float32(1.0))
        stretched = np.clip(levels.astype(np.float32) * scale + (-lo_f * scale), 0.0, 255.0)
        return np.where(hi > lo, stretched.astype(np.uint8), levels.astype(np.uint8))
    if name == "Equalize":
        last = np.take_along_axis(hist, hi, -1)                          # the top level's count
        step = (hist.sum(-1, keepdims=True) - last) // 255
        safe = np.maximum(step, 1)
        table = np.empty_like(hist)
        table[..., 0] = 0                                               # shifted by one level
        table[..., 1:] = (hist[..., :-1].cumsum(-1) + safe // 2) // safe
        return np.where(step > 0, np.minimum(table, 255), levels).astype(np.uint8)
    raise ValueError(f"{name} has no histogram table")


def _affine(name: str, arg: float, h: int, w: int) -> tuple[float, ...]:
    """(a, b, c, d, e, f): output pixel (x, y) reads input (a x + b y + c, d x + e y + f), in index
    coordinates: tensorflow_addons' rotate / transform / translate as DeepMind calls them."""
    if name == "Rotate":
        radians = np.float32(arg * (math.pi / 180.0))
        cos, sin = np.cos(radians, dtype=np.float32), np.sin(radians, dtype=np.float32)
        wf, hf = np.float32(w - 1), np.float32(h - 1)
        x_off = (wf - (cos * wf - sin * hf)) / np.float32(2.0)
        y_off = (hf - (sin * wf + cos * hf)) / np.float32(2.0)
        return (cos, -sin, x_off, sin, cos, y_off)
    if name == "ShearX":
        return (1.0, arg, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, arg, 1.0, 0.0)
    if name == "TranslateX":
        return (1.0, 0.0, arg, 0.0, 1.0, 0.0)
    if name == "TranslateY":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg)
    raise ValueError(f"{name} is not geometric")


@functools.lru_cache(maxsize=256)
def source_map(name: str, arg: float, h: int, w: int) -> np.ndarray:
    """(h * w,) int64: for each output pixel the flat index of the input pixel it takes, or h * w
    (the fill) outside the image. float32 coordinates, rounded half away from zero (std::round),
    as TensorFlow's ImageProjectiveTransform with nearest interpolation computes them."""
    a, b, c, d, e, f = (np.float32(v) for v in _affine(name, arg, h, w))
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    xi = (np.sign(x_in) * np.floor(np.abs(x_in) + np.float32(0.5))).astype(np.int64)
    yi = (np.sign(y_in) * np.floor(np.abs(y_in) + np.float32(0.5))).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.where(inside, yi * w + xi, h * w).reshape(-1)
    out.setflags(write=False)                       # shared by every caller through the cache
    return out


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """DeepMind's blend on uint8 tensors (float32 arithmetic, truncating cast)."""
    if factor == 1.0:
        return x
    d = degenerate.float()
    out = d + factor * (x.float() - d)
    if not 0.0 < factor < 1.0:
        out = out.clamp(0.0, 255.0)
    return out.to(torch.uint8)


GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)          # tf.image.rgb_to_grayscale


def grey(x: torch.Tensor) -> torch.Tensor:
    """tf.image.rgb_to_grayscale of uint8 (..., H, W, 3) -> uint8 (..., H, W, 1): to float32 in
    0..1, weighted sum, back by x 255.5 and a truncating cast."""
    f = x.float() * np.float32(1.0 / 255.0)
    g = f[..., 0:1] * GREY_WEIGHTS[0] + f[..., 1:2] * GREY_WEIGHTS[1] + f[..., 2:3] * GREY_WEIGHTS[2]
    return (g * 255.5).to(torch.uint8)


def color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Color on uint8 (..., H, W, 3): blend with the image's grey."""
    return _blend(grey(x), x, factor) if factor != 1.0 else x


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13.0)


def sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Sharpness on uint8 (n, H, W, 3): blend with the 3x3-smoothed image (PIL's SMOOTH kernel,
    inside the border; border pixels keep their values). The nine products are summed in
    float32 row by row, left to right, from zero: TensorFlow's depthwise convolution's order,
    which a library convolution does not promise (its sums differ in the last bit, and the
    truncating cast turns that into a grey level)."""
    if factor == 1.0:
        return x
    _, h, w, _ = x.shape
    f = x.float()
    acc = torch.zeros_like(f[:, 1:-1, 1:-1])
    for dy in range(3):
        for dx in range(3):
            acc = acc + f[:, dy:dy + h - 2, dx:dx + w - 2] * float(_SMOOTH[dy, dx])
    degenerate = x.clone()
    degenerate[:, 1:-1, 1:-1] = acc.clamp(0.0, 255.0).to(torch.uint8)
    return _blend(degenerate, x, factor)


# ------------------------------------------------------------------------------------------------
# The CPU: one image at a time, in the loader worker
# ------------------------------------------------------------------------------------------------

def apply_cpu(image: np.ndarray, ops: list[Op]) -> np.ndarray:
    """The operations on one uint8 (H, W, 3) image, in order; returns a new array (or the image
    itself when no operation changes it). Consecutive table operations are composed into one
    table and applied in one pass (a table maps levels to levels, so their composition is
    exact; a histogram after a table is the histogram's image through it)."""
    x = image if image.flags.c_contiguous and image.flags.writeable else np.array(image)
    h, w, _ = x.shape
    i = 0
    while i < len(ops):
        op = ops[i]
        if op.name in TABLES:
            j = i + 1
            while j < len(ops) and ops[j].name in TABLES:
                j += 1
            x, i = _apply_tables(x, ops[i:j]), j
            continue
        if op.name in ("TranslateX", "TranslateY") and float(op.arg).is_integer():
            x = _shifted(x, int(op.arg), axis=1 if op.name == "TranslateX" else 0)
        elif op.name in GEOMETRIC:
            flat = np.concatenate([x.reshape(-1), np.full(3, FILL, np.uint8)])
            x = flat.take(_byte_map(op.name, op.arg, h, w)).reshape(h, w, 3)
        elif op.name == "Cutout":
            top, bottom, left, right = op.box
            x = x.copy()
            x[top:bottom, left:right] = FILL
        elif op.name in ("Color", "Sharpness") and op.arg == 1.0:
            pass                                        # blend(d, x, 1) is x
        elif op.name == "Color":
            x = color(torch.from_numpy(np.array(x)), op.arg).numpy()
        elif op.name == "Sharpness":
            x = sharpness(torch.from_numpy(np.array(x))[None], op.arg)[0].numpy()
        else:
            raise ValueError(f"unknown RandAugment operation {op.name}")
        i += 1
    return x


def _apply_tables(x: np.ndarray, run: list[Op]) -> np.ndarray:
    """A run of table operations as one table: a single lookup per byte when the tables do not
    look at the image (two bytes at a time), else PIL's histogram and per-band lookup."""
    h, w, _ = x.shape
    run = [op for op in run if op.name in HISTOGRAM or not _is_identity(op.name, op.arg, h * w)]
    if not run:
        return x
    if len(run) == 1 and run[0].name == "Invert":            # one SIMD pass: 3 vs 68 us
        return np.bitwise_not(x)
    if len(run) == 1 and run[0].name == "Posterize":
        return np.bitwise_and(x, fixed_table("Posterize", run[0].arg, h * w)[255])
    if not any(op.name in HISTOGRAM for op in run):
        table = np.arange(256, dtype=np.uint8)
        for op in run:
            table = fixed_table(op.name, op.arg, h * w)[table]
        if x.size % 2:
            return table.take(x)
        pairs = _pair_table(table.tobytes())
        return pairs.take(x.reshape(-1).view(np.uint16)).view(np.uint8).reshape(h, w, 3)
    img = Image.fromarray(x)
    hist = np.asarray(img.histogram(), dtype=np.int64).reshape(3, 256)
    tables = None                                       # the composition so far (None: identity)
    for op in run:
        if op.name in HISTOGRAM:                        # the histogram through the tables so far
            now = hist if tables is None else np.stack(
                [np.bincount(tables[c], weights=hist[c], minlength=256) for c in range(3)])
            step = histogram_tables(op.name, now.astype(np.int64)[None])[0]
        else:
            step = np.broadcast_to(fixed_table(op.name, op.arg, h * w), (3, 256))
        tables = step if tables is None else np.take_along_axis(step, tables.astype(np.int64), -1)
    return np.asarray(img.point(_BandTables(tables)))


class _BandTables(Image.ImagePointHandler):
    """Per-band tables for PIL's `point`, handed to its C lookup as they are: `Image.point`
    rounds every entry of a table in Python first (768 calls: a third of a histogram op)."""

    def __init__(self, tables: np.ndarray):
        self.lut = tables.reshape(-1).tolist()

    def point(self, im: Image.Image) -> Image.Image:
        return im._new(im.im.point(self.lut, None))


def _shifted(x: np.ndarray, pixels: int, axis: int) -> np.ndarray:
    """A translation by whole pixels as two slice copies: output index i reads input i + pixels
    (exactly what `source_map` gives for an integer shift; 10x cheaper than the gather)."""
    out = np.full_like(x, FILL)
    n = x.shape[axis]
    k = min(abs(pixels), n)
    src = [slice(None)] * 2
    dst = [slice(None)] * 2
    src[axis], dst[axis] = (slice(k, n), slice(0, n - k)) if pixels >= 0 else \
        (slice(0, n - k), slice(k, n))
    out[tuple(dst)] = x[tuple(src)]
    return out


@functools.lru_cache(maxsize=32)
def _byte_map(name: str, arg: float, h: int, w: int) -> np.ndarray:
    """`source_map` per byte of an (h, w, 3) image: one flat gather of bytes is twice as fast as
    a gather of 3-byte pixels (measured: 136 vs 253 us at 192 px)."""
    pixels = source_map(name, arg, h, w)
    out = (pixels[:, None] * 3 + np.arange(3)).reshape(-1)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=64)
def _is_identity(name: str, arg: float, pixels: int) -> bool:
    return bool((fixed_table(name, arg, pixels) == np.arange(256)).all())


@functools.lru_cache(maxsize=128)
def _pair_table(table_bytes: bytes) -> np.ndarray:
    """A 256-entry table applied to two bytes at once: (65536,) uint16. A lookup costs per
    element, so half the elements halve it (measured: 64 vs 112 us for a 192 px image)."""
    table = np.frombuffer(table_bytes, np.uint8).astype(np.uint16)
    both = np.arange(65536)
    out = table[both & 255] | (table[both >> 8] << 8)
    out.setflags(write=False)
    return out


# ------------------------------------------------------------------------------------------------
# The device: a whole batch, one gather per kind of operation and layer
# ------------------------------------------------------------------------------------------------

def apply_batch(images: torch.Tensor, ops: list[list[Op]]) -> torch.Tensor:
    """Each image's operations on a uint8 (n, H, W, 3) batch (any device). Per layer the images
    whose op is a table share one lookup, those whose op is geometric one gather, and Color,
    Sharpness and Cutout run on their own rows; index tensors reach the device with
    non-blocking copies, so the host never waits for the GPU."""
    x = images
    n, h, w, _ = x.shape
    dev = x.device
    for layer in range(max((len(o) for o in ops), default=0)):
        chosen = [o[layer] if layer < len(o) else None for o in ops]
        x = _tables_layer(x, chosen)
        x = _geometric_layer(x, chosen)
        for name, fn in (("Color", color), ("Sharpness", sharpness)):
            for factor in {op.arg for op in chosen if op is not None and op.name == name}:
                rows = [i for i, op in enumerate(chosen) if op is not None and op.name == name
                        and op.arg == factor]
                idx = _to(torch.tensor(rows), dev)
                x = x.index_copy(0, idx, fn(x.index_select(0, idx), factor))
        cut = [(i, op.box) for i, op in enumerate(chosen) if op is not None and op.name == "Cutout"]
        if cut:
            mask = torch.zeros(n, h, w, dtype=torch.bool)
            for i, (top, bottom, left, right) in cut:
                mask[i, top:bottom, left:right] = True
            x = x.masked_fill(_to(mask, dev)[..., None], FILL)
    return x


def _tables_layer(x: torch.Tensor, chosen: list[Op | None]) -> torch.Tensor:
    n, h, w, _ = x.shape
    rows = [i for i, op in enumerate(chosen) if op is not None and op.name in TABLES]
    if not rows:
        return x
    identity = np.arange(256, dtype=np.uint8)
    fixed = np.stack([np.tile(fixed_table(op.name, op.arg, h * w) if op is not None and op.name
                              in TABLES and op.name not in ("AutoContrast", "Equalize")
                              else identity, (3, 1)) for op in chosen])
    tables = _to(torch.from_numpy(fixed), x.device)                       # (n, 3, 256)
    for name in ("AutoContrast", "Equalize"):
        sel = [i for i, op in enumerate(chosen) if op is not None and op.name == name]
        if sel:
            idx = _to(torch.tensor(sel), x.device)
            hist = _histograms(x.index_select(0, idx)).cpu().numpy()      # 3 x 256 counts each
            tables = tables.index_copy(0, idx, _to(torch.from_numpy(histogram_tables(name, hist)),
                                                   x.device))
    base = (torch.arange(n, device=x.device).view(n, 1, 1, 1) * 3
            + torch.arange(3, device=x.device).view(1, 1, 1, 3)) * 256
    return tables.reshape(-1)[x.long() + base]


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """(k, 3, 256) int64 counts of uint8 (k, H, W, 3)."""
    k = x.shape[0]
    base = (torch.arange(k, device=x.device).view(k, 1, 1, 1) * 3
            + torch.arange(3, device=x.device).view(1, 1, 1, 3)) * 256
    counts = torch.zeros(k * 3 * 256, dtype=torch.long, device=x.device)
    counts.scatter_add_(0, (x.long() + base).reshape(-1), torch.ones(x.numel(), dtype=torch.long,
                                                                      device=x.device))
    return counts.view(k, 3, 256)


def _geometric_layer(x: torch.Tensor, chosen: list[Op | None]) -> torch.Tensor:
    n, h, w, _ = x.shape
    if not any(op is not None and op.name in GEOMETRIC for op in chosen):
        return x
    identity = np.arange(h * w, dtype=np.int64)
    maps = np.stack([source_map(op.name, op.arg, h, w) if op is not None and op.name in GEOMETRIC
                     else identity for op in chosen])                     # (n, h*w)
    flat = torch.cat([x.reshape(n, h * w, 3),
                      torch.full((n, 1, 3), FILL, dtype=x.dtype, device=x.device)], 1)
    index = _to(torch.from_numpy(maps), x.device)[..., None].expand(n, h * w, 3)
    return flat.gather(1, index).view(n, h, w, 3)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device, non_blocking=True)
