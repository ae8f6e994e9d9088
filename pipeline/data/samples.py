"""A raw sample from a shard, opened: its label, its image's size (and pixels, decoded), and what
is wrong with it, if anything, in words a user can act on. Training (pipeline/data/reader.py) and
evaluation (pipeline/data/loader.py) read samples through here.

A training crop often ends well above an image's bottom row (an Inception crop's bottom is at 85%
of the height on average), and a sequential JPEG is coded top to bottom: `open_rows` opens it as
only the rows a crop needs, so that libjpeg decodes those and stops. Their pixels are the full
decode's, bit for bit (tests/test_samples.py checks every chroma subsampling PIL writes), and the
CPU path decodes ~15% fewer rows (benchmarks/RESULTS.md). Bytes damaged below a crop then go
unnoticed by that decode (the pixels used are intact), so a damaged sample may be replaced in one
epoch and not in the next, as its crop moves. The shard stage decoded every image whole, and a
local shard read through is checked against the manifest's sha256 (pipeline/data/shard_reader.py);
remote shards, and shards read in part, get no such check.
"""
from __future__ import annotations

import io
import re
from typing import NamedTuple

from PIL import Image

from pipeline.data.shard_reader import DataError, fix_hint

SEQUENTIAL = (0xC0, 0xC1)     # SOF0 baseline, SOF1 extended sequential (Huffman): coded top to bottom
# Rows decoded below the last one asked for. libjpeg's "fancy" chroma upsampling (4:2:0) blends
# each chroma row with the one below it: a JPEG cut short right after row r - 1 repeats its last
# chroma row instead, which changes row r - 1 when r is even (tests/test_samples.py: with no
# margin half of all cuts differ; with one row none do). Two rows, for a margin.
ROW_MARGIN = 2


class JpegFrame(NamedTuple):
    """A JPEG's frame header (SOFn): its size, where its height is written, how it is coded."""
    height: int
    width: int
    height_at: int            # byte offset of the 2-byte big-endian height
    sequential: bool          # baseline or extended sequential Huffman (not progressive)


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of JPEG bytes, read by walking the marker segments before it; None when
    the bytes are not a JPEG or its header cannot be read that way (PIL then reads them)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                       # fill byte before a marker
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # SOFn (not DHT/JPG/DAC)
            if i + 9 > n:
                return None
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return JpegFrame(height, width, i + 5, marker in SEQUENTIAL) if height and width else None
        if marker < 0xC0 or marker == 0xDA or 0xD0 <= marker <= 0xD9:
            return None      # no marker (FF00, TEM, reserved), a scan, or one with no segment here
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def open_image(data: bytes) -> Image.Image:
    """A JPEG (or any image PIL reads), opened: its size is known, its pixels not decoded yet."""
    return Image.open(io.BytesIO(data))


def open_rows(data: bytes, rows: int) -> Image.Image:
    """`data` opened for its first `rows` rows: a sequential JPEG taller than rows + ROW_MARGIN is
    opened as that many rows (its frame header's height rewritten), so that decoding it stops
    there; anything else is opened whole. Either way rows 0 .. rows - 1 decode to exactly the
    full image's pixels."""
    frame = jpeg_frame(data)
    keep = rows + ROW_MARGIN
    if frame is None or not frame.sequential or keep >= frame.height:
        return open_image(data)
    at, view = frame.height_at, memoryview(data)
    return open_image(b"".join((view[:at], keep.to_bytes(2, "big"), view[at + 2:])))  # one copy


def decode(img: Image.Image) -> Image.Image:
    """An opened image's pixels, decoded, as RGB."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.load()
    return img


def open_sample(raw: dict, complete_jpeg: bool
                ) -> tuple[tuple[int, int] | None, int, str | None]:
    """(the image's (height, width), its label, the problem or None). With `complete_jpeg` (the
    device path, whose decoder takes JPEGs only) the bytes must also be a whole JPEG (FFD8 ...
    FFD9) whose header PIL reads. Otherwise a JPEG's size comes from its frame header, and other
    formats' from PIL: pixels that do not decode are found when the image is decoded."""
    if raw.get("__error__"):
        return None, -1, raw["__error__"]
    try:
        label = int(raw["cls"])
    except Exception as e:
        return None, -1, f"no readable label ({e})"
    data = raw.get("jpg")
    if not data:
        return None, -1, "no jpg member"
    if complete_jpeg and (data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9"):
        return None, -1, "not a complete JPEG (truncated or damaged bytes)"
    frame = None if complete_jpeg else jpeg_frame(data)
    if frame is not None:
        return (frame.height, frame.width), label, None
    try:
        img = open_image(data)
    except Exception as e:
        return None, -1, problem_of(e)
    return (img.height, img.width), label, None


def problem_of(e: Exception) -> str:
    """An image's decoding error, in one line (PIL's messages name a BytesIO object)."""
    reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    return f"cannot be decoded ({type(e).__name__}: {reason})"


def decode_sample(raw: dict) -> tuple[Image.Image, int]:
    """A sample's decoded RGB image and label; DataError names the sample and the fix otherwise."""
    _, label, problem = open_sample(raw, complete_jpeg=False)
    if not problem:
        try:
            return decode(open_image(raw["jpg"])), label
        except Exception as e:
            problem = problem_of(e)
    url = raw.get("__url__", "?")
    raise DataError(f"sample {raw.get('__key__', '?')} in {url} {problem}; {fix_hint(url)}")
