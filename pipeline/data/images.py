"""Image bytes in, shard-ready RGB JPEG bytes out: decode fully, convert to RGB, resize, re-encode.

Every image is decoded completely, so a truncated or corrupt file fails here (and is skipped by the
writer) instead of in a training run. An RGB JPEG that needs no resizing keeps its original bytes:
re-encoding would only lose quality. Orientation is left as stored (no EXIF transpose), the same
as timm's and torchvision's ImageNet readers see it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

WHITE = (255, 255, 255)


def target_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int] | None:
    """(w, h) with the shorter side equal to `max_size`, or None when no downscale is needed."""
    w, h = size
    if max_size is None or min(w, h) <= max_size:
        return None
    if w <= h:
        return max_size, max(1, round(h * max_size / w))
    return max(1, round(w * max_size / h)), max_size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16-bit rescaled, alpha composited over white, CMYK/P/L/1
    converted."""
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow's convert() clips 16-bit values at 255 (a near-white image); rescale instead.
        # 32-bit "I" comes from 16-bit PNG/TIFF data, so its range is taken as 16-bit too.
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if img.mode != "F" else a * (255.0 if a.max(initial=0) <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB")
                                                            and "transparency" in img.info):
        # Fully transparent pixels hold arbitrary colours; white is what a viewer shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open(raw: bytes) -> Image.Image:
    """Image.open, with reasons fit for the skip report: Pillow's name the BytesIO object (a memory
    address that differs on every run) instead of what is wrong with the bytes."""
    if not raw:
        raise ValueError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file ({len(raw)} bytes, starting "
                                     f"{raw[:8]!r}): not an image format Pillow reads") from None


def encode_image(raw: bytes, max_size: int | None, quality: int) -> bytes:
    """Shard-ready JPEG bytes of an image file's bytes. Raises (OSError, ValueError, ...) when the
    image cannot be decoded completely."""
    img = _open(raw)
    target = target_size(img.size, max_size)
    keep = target is None and img.format == "JPEG" and img.mode == "RGB"
    if target is not None and img.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale in the DCT domain while staying >= 2x the target (as
        # Image.thumbnail does): far less decoding for large photos, no visible quality loss.
        img.draft(None, (2 * target[0], 2 * target[1]))
    img.load()
    if keep:
        return raw
    img = to_rgb(img)
    if target is not None:
        img = img.resize(target, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
