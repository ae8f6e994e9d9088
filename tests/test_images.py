"""encode_image: every Pillow mode becomes 8-bit RGB JPEG; resizing (with JPEG draft decoding);
unreadable bytes fail with a reason fit for the skip report."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import encode_image, target_size


def encoded(img: Image.Image, fmt: str = "PNG", max_size=None, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    out = Image.open(io.BytesIO(encode_image(buf.getvalue(), max_size, 95)))
    assert out.format == "JPEG" and out.mode == "RGB"
    return out


def half_transparent(mode: str) -> Image.Image:
    img = Image.new("RGBA", (32, 32), (200, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 16, 32))                # left half: transparent black
    return img.convert(mode) if mode != "RGBA" else img


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_white(mode):
    a = np.asarray(encoded(half_transparent(mode)), float)
    assert a[:, :14].min() > 240                            # not the hidden black
    assert a[:, 18:].mean() < 200                           # the opaque half keeps its colour


def test_palette_transparency_is_composited_over_white():
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 10, 120, 10] + [0] * 762)
    img.paste(0, (0, 0, 16, 32))
    a = np.asarray(encoded(img, transparency=0), float)
    assert a[:, :14].min() > 240 and a[:, 18:, 1].mean() > 100


@pytest.mark.parametrize("mode, value, expected", [("I;16", 65535, 255), ("I;16", 257 * 40, 40),
                                                   ("I", 257 * 200, 200), ("1", 1, 255)])
def test_deep_and_bilevel_images_are_rescaled(mode, value, expected):
    if mode == "1":
        img = Image.new("1", (16, 16), value)
    else:
        img = Image.fromarray(np.full((16, 16), value, np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    fmt = "TIFF" if mode == "I" else "PNG"
    assert abs(np.asarray(encoded(img, fmt), float).mean() - expected) < 2


def test_cmyk_jpeg_becomes_rgb():
    out = encoded(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG")   # pure red in CMYK
    r, g, b = np.asarray(out, float).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_large_jpeg_resize_with_draft_matches_full_decode():
    rng = np.random.default_rng(0)
    base = rng.normal(128, 40, (75, 100, 3)).clip(0, 255).astype(np.uint8)
    big = Image.fromarray(base).resize((800, 600), Image.BICUBIC)     # smooth, photo-like
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    fast = Image.open(io.BytesIO(encode_image(buf.getvalue(), 64, 95)))
    assert fast.size == (85, 64) == target_size((800, 600), 64)
    full = Image.open(io.BytesIO(buf.getvalue())).resize((85, 64), Image.BICUBIC)
    slow = io.BytesIO()
    full.save(slow, "JPEG", quality=95)                     # the same path without draft()
    assert np.abs(np.asarray(fast, float) - np.asarray(Image.open(slow), float)).mean() < 3


def test_small_rgb_jpeg_keeps_its_bytes_and_others_are_reencoded():
    buf = io.BytesIO()
    Image.new("RGB", (20, 30), (1, 2, 3)).save(buf, "JPEG", quality=70)
    assert encode_image(buf.getvalue(), 30, 95) == buf.getvalue()
    assert encode_image(buf.getvalue(), None, 95) == buf.getvalue()
    assert encode_image(buf.getvalue(), 10, 95) != buf.getvalue()
    with pytest.raises(OSError):
        encode_image(buf.getvalue()[:-40], 30, 95)          # truncated: fails, never half-decoded


def test_unreadable_bytes_fail_with_a_stable_reason():
    with pytest.raises(ValueError, match=r"^empty file \(0 bytes\)$"):
        encode_image(b"", None, 95)
    with pytest.raises(OSError) as e:
        encode_image(b"plain text with a .jpg name", None, 95)
    # Pillow's own message names the BytesIO object, a memory address that changes every run.
    assert "cannot identify image file" in str(e.value) and "BytesIO" not in str(e.value)
    assert "27 bytes" in str(e.value)
