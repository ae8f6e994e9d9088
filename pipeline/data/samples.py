"""A raw sample from a shard, opened: its label, its image (header read, or decoded), and what is
wrong with it, if anything, in words a user can act on. Training (pipeline/data/reader.py) and
evaluation (pipeline/data/loader.py) read samples through here.
"""
from __future__ import annotations

import io
import re

from PIL import Image

from pipeline.data.shard_reader import DataError, fix_hint


def open_image(data: bytes) -> Image.Image:
    """A JPEG (or any image PIL reads), opened: its size is known, its pixels not decoded yet."""
    return Image.open(io.BytesIO(data))


def decode(img: Image.Image) -> Image.Image:
    """An opened image's pixels, decoded, as RGB."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.load()
    return img


def open_sample(raw: dict, header_only: bool
                ) -> tuple[Image.Image | tuple[int, int] | None, int, str | None]:
    """(the opened image (header read, pixels not decoded), or with `header_only` (the device
    path decodes) its (height, width) once the file is checked to be a complete JPEG (FFD8 ...
    FFD9); the label; the problem, or None)."""
    if raw.get("__error__"):
        return None, -1, raw["__error__"]
    try:
        label = int(raw["cls"])
    except Exception as e:
        return None, -1, f"no readable label ({e})"
    data = raw.get("jpg")
    if not data:
        return None, -1, "no jpg member"
    if header_only and (data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9"):
        return None, -1, "not a complete JPEG (truncated or damaged bytes)"
    try:
        img = open_image(data)
    except Exception as e:
        return None, -1, problem_of(e)
    return ((img.height, img.width) if header_only else img), label, None


def problem_of(e: Exception) -> str:
    """An image's decoding error, in one line (PIL's messages name a BytesIO object)."""
    reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    return f"cannot be decoded ({type(e).__name__}: {reason})"


def decode_sample(raw: dict) -> tuple[Image.Image, int]:
    """A sample's decoded RGB image and label; DataError names the sample and the fix otherwise."""
    image, label, problem = open_sample(raw, header_only=False)
    if not problem:
        try:
            return decode(image), label
        except Exception as e:
            problem = problem_of(e)
    url = raw.get("__url__", "?")
    raise DataError(f"sample {raw.get('__key__', '?')} in {url} {problem}; {fix_hint(url)}")
