"""Opening a raw shard sample (pipeline/data/samples.py): label, image or its size, and what is
wrong with it in words a user can act on; real JPEG and PNG bytes, as webdataset yields them."""
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.samples import decode_sample, open_sample, problem_of
from pipeline.data.shard_reader import DataError


def image_bytes(mode: str = "RGB", fmt: str = "JPEG", size=(24, 16)) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


def raw(jpg: bytes | None, cls: bytes | None = b"3", key="000042") -> dict:
    sample = {"__key__": key, "__url__": "/data/shards/train-000007.tar"}
    if jpg is not None:
        sample["jpg"] = jpg
    if cls is not None:
        sample["cls"] = cls
    return sample


def test_a_good_sample_opens_to_its_label_and_rgb_pixels_or_its_size():
    jpg = image_bytes()
    image, label, problem = open_sample(raw(jpg), header_only=False)
    assert problem is None and label == 3 and image.size == (24, 16)
    assert open_sample(raw(jpg), header_only=True) == ((16, 24), 3, None)   # (height, width)
    decoded, label = decode_sample(raw(image_bytes("L")))                    # grey in, RGB out
    assert decoded.mode == "RGB" and label == 3
    assert np.asarray(decoded).shape == (16, 24, 3)


def test_each_problem_is_named_and_decode_sample_says_where_and_the_fix():
    jpg = image_bytes()
    assert open_sample(raw(jpg, cls=b"x"), False)[2].startswith("no readable label")
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
