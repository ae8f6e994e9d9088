"""Opening a raw shard sample (pipeline/data/samples.py): label, image size, and what is wrong
with it in words a user can act on; a JPEG decoded only down to the rows a crop needs, with the
full decode's pixels. Real JPEG and PNG bytes, as webdataset yields them."""
import io

import numpy as np
import pytest
from PIL import Image, features

from pipeline.data.samples import (
    ROW_MARGIN,
    decode_sample,
    jpeg_frame,
    open_image,
    open_rows,
    open_sample,
    problem_of,
)
from pipeline.data.shard_reader import DataError


def image_bytes(mode: str = "RGB", fmt: str = "JPEG", size=(24, 16), **save) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **save)
    return buf.getvalue()


def raw(jpg: bytes | None, cls: bytes | None = b"3", key="000042") -> dict:
    sample = {"__key__": key, "__url__": "/data/shards/train-000007.tar"}
    if jpg is not None:
        sample["jpg"] = jpg
    if cls is not None:
        sample["cls"] = cls
    return sample


def test_a_good_sample_opens_to_its_label_and_size_and_decodes_to_rgb_pixels():
    jpg = image_bytes()
    assert open_sample(raw(jpg), complete_jpeg=False) == ((16, 24), 3, None)   # (height, width)
    assert open_sample(raw(jpg), complete_jpeg=True) == ((16, 24), 3, None)
    png = image_bytes(fmt="PNG", size=(30, 20))                   # not a JPEG: PIL reads the size
    assert open_sample(raw(png), complete_jpeg=False) == ((20, 30), 3, None)
    decoded, label = decode_sample(raw(image_bytes("L")))                    # grey in, RGB out
    assert decoded.mode == "RGB" and label == 3
    assert np.asarray(decoded).shape == (16, 24, 3)


def test_each_problem_is_named_and_decode_sample_says_where_and_the_fix():
    jpg = image_bytes()
    assert open_sample(raw(jpg, cls=b"x"), False)[2].startswith("no readable label")
    assert open_sample(raw(b"not an image at all"), False)[2].startswith("cannot be decoded")
    assert open_sample(raw(None), False)[2] == "no jpg member"
    assert open_sample({"__error__": "tar member cut short"}, False)[2] == "tar member cut short"
    cut = jpg[: len(jpg) // 2]
    assert open_sample(raw(cut), True)[2] == "not a complete JPEG (truncated or damaged bytes)"
    assert open_sample(raw(image_bytes(fmt="PNG")), True)[2].startswith("not a complete JPEG")
    with pytest.raises(DataError) as e:
        decode_sample(raw(cut))                      # the header opens, the pixels do not
    message = str(e.value)
    assert message.startswith("sample 000042 in /data/shards/train-000007.tar cannot be decoded")
    assert "python stages/shard.py --verify --out /data/shards" in message
    assert "BytesIO" not in problem_of(OSError("cannot identify image file <_io.BytesIO object at "
                                               "0x7f00deadbeef>"))


# ------------------------------------------------------------------------------------------------
# Decoding only the rows a crop needs
# ------------------------------------------------------------------------------------------------

SAVES = {"4:4:4": {"subsampling": 0}, "4:2:2": {"subsampling": 1}, "4:2:0": {"subsampling": 2},
         "4:2:0, a restart marker every row": {"subsampling": 2, "restart_marker_rows": 1},
         "greyscale": {"mode": "L"}, "CMYK": {"mode": "CMYK"}}


@pytest.mark.parametrize("save", SAVES.values(), ids=SAVES.keys())
def test_the_rows_a_crop_needs_decode_to_the_full_images_pixels_and_no_further(save):
    """Every cut of a 157 x 203 noise image (the hardest case for chroma upsampling): rows
    0 .. r - 1 opened with open_rows are the full decode's, bit for bit, and the decoder is
    given only r + ROW_MARGIN rows."""
    save = dict(save)
    jpg = image_bytes(save.pop("mode", "RGB"), size=(157, 203), quality=90, **save)
    full = np.asarray(open_image(jpg))
    assert jpeg_frame(jpg)[:2] == (203, 157) and jpeg_frame(jpg).sequential
    for rows in range(1, 204):
        img = open_rows(jpg, rows)
        assert img.size == (157, min(203, rows + ROW_MARGIN))
        assert np.array_equal(np.asarray(img)[:rows], full[:rows]), rows


@pytest.mark.skipif(not features.check_feature("libjpeg_turbo"),
                    reason="libjpeg-turbo's chroma upsampling (IJG libjpeg 9 upsamples per block)")
def test_without_the_margin_4_2_0_rows_would_differ():
    """Why ROW_MARGIN exists: a 4:2:0 JPEG cut right below row r - 1 changes that row for half
    of all r (its chroma is blended with a repeated row instead of the next one)."""
    jpg = image_bytes(size=(157, 203), quality=90, subsampling=2)
    full, frame = np.asarray(open_image(jpg)), jpeg_frame(jpg)
    differ = 0
    for rows in range(1, 203):
        cut = bytearray(jpg)
        cut[frame.height_at:frame.height_at + 2] = rows.to_bytes(2, "big")
        differ += not np.array_equal(np.asarray(open_image(bytes(cut)))[:rows], full[:rows])
    assert differ == 101


def test_what_cannot_be_cut_is_opened_whole():
    progressive = image_bytes(size=(64, 80), progressive=True)
    assert not jpeg_frame(progressive).sequential                 # every scan covers every row
    assert open_rows(progressive, 10).size == (64, 80)
    assert np.array_equal(np.asarray(open_rows(progressive, 10)), np.asarray(open_image(progressive)))
    png = image_bytes(fmt="PNG", size=(64, 80))
    assert jpeg_frame(png) is None and open_rows(png, 10).size == (64, 80)
    jpg = image_bytes(size=(64, 80))
    assert open_rows(jpg, 80 - ROW_MARGIN).size == (64, 80)       # nothing to save
    assert jpeg_frame(jpg[:100]) is None                          # cut inside its header


def test_a_frame_header_is_read_only_where_it_is_certain():
    """jpeg_frame gives the size PIL gives, past fill bytes; anything it cannot walk for certain
    (no JPEG, a byte that is no marker, a height left to a DNL segment) is None: PIL decides."""
    jpg = image_bytes(size=(40, 30))
    assert jpeg_frame(jpg)[:2] == (30, 40)
    filled = jpg[:2] + b"\xff\xff\xff" + jpg[2:]                   # fill bytes before a marker
    assert jpeg_frame(filled)[:2] == (30, 40) and open_image(filled).size == (40, 30)
    assert jpeg_frame(jpg[:2] + b"\xff\x00" + jpg[2:]) is None      # a stuffed zero: no marker
    assert jpeg_frame(jpg[:2] + b"\xff\x01" + jpg[2:]) is None      # TEM: no segment length
    assert jpeg_frame(b"\xff\xd8" + b"not a JPEG after all" * 5) is None
    frame = jpeg_frame(jpg)
    dnl = bytearray(jpg)
    dnl[frame.height_at:frame.height_at + 2] = b"\x00\x00"              # height given later (DNL)
    assert jpeg_frame(bytes(dnl)) is None
