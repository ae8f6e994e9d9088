"""RandAugment as DeepMind defines it (pipeline/data/randaugment.py): every operation against the
outputs of DeepMind's own nfnets/autoaugment.py (tests/data/dm_randaugment_golden.npz: TensorFlow
and tensorflow-addons ran it outside this repository; see the .md beside it), on the CPU path and
on the batched device path; the magnitudes against DeepMind's `level_to_arg`; the draws."""
import collections
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import randaugment as ra

GOLDEN = np.load(Path(__file__).parent / "data" / "dm_randaugment_golden.npz")
CASES = sorted(k for k in GOLDEN.files if "|" in k)


def _case(key: str) -> tuple[np.ndarray, ra.Op, np.ndarray]:
    name, arg, k = key.split("|")
    return GOLDEN[f"input_{k}"], ra.Op(name, 0.0 if arg == "None" else float(arg)), GOLDEN[key]


@pytest.mark.parametrize("name", [n for n in ra.OPS if n != "Cutout"])
def test_every_operation_is_deepminds_on_both_paths(name):
    """Bit for bit: 16 operations (Cutout below) at magnitudes 2-15, both signs, on noise,
    gradients, a low-contrast image and an almost constant one (Equalize's step 0, AutoContrast's
    hi == lo), non-square, including the tie cases of the nearest-neighbour rounding."""
    keys = [k for k in CASES if k.startswith(name + "|")]
    assert len(keys) >= 4, name
    for key in keys:
        x, op, expected = _case(key)
        cpu = ra.apply_cpu(x, [op])
        batch = ra.apply_batch(torch.from_numpy(x)[None], [[op]])[0].numpy()
        assert np.array_equal(cpu, expected), (key, int((cpu != expected).any(-1).sum()))
        assert np.array_equal(batch, expected), (key, int((batch != expected).any(-1).sum()))


def test_the_fixture_would_catch_the_usual_departures():
    """The golden data tells DeepMind's choices from the nearby ones: a Solarize threshold that
    does not wrap, the image mean instead of H W / 256 for Contrast, rotation about W / 2."""
    x, _, wrapped = _case("Solarize|256|0")
    assert np.array_equal(wrapped, 255 - x)                       # 256 wraps to 0: all inverted
    x, _, contrast = _case("Contrast|2.8000000000000003|2")
    mean_grey = ra._blend_table(float(ra.grey(torch.from_numpy(x)).float().mean()), 2.8)
    assert not np.array_equal(contrast, mean_grey[x])
    x, op, rotated = _case("Rotate|15.0|0")
    assert np.array_equal(rotated, _rotate_about(x, 15.0, (x.shape[1] - 1) / 2, (x.shape[0] - 1) / 2))
    assert not np.array_equal(rotated, _rotate_about(x, 15.0, x.shape[1] / 2, x.shape[0] / 2))


def _rotate_about(x: np.ndarray, degrees: float, cx: float, cy: float) -> np.ndarray:
    """A rotation written out independently: output (u, v) reads the input at the rotated point
    about (cx, cy), float32, rounded half away from zero, 128 outside."""
    h, w, _ = x.shape
    t = np.float32(degrees * (np.pi / 180.0))
    c, s = np.cos(t, dtype=np.float32), np.sin(t, dtype=np.float32)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    xu = c * (u - np.float32(cx)) - s * (v - np.float32(cy)) + np.float32(cx)
    yv = s * (u - np.float32(cx)) + c * (v - np.float32(cy)) + np.float32(cy)
    xi, yi = (np.sign(a) * np.floor(np.abs(a) + np.float32(0.5)) for a in (xu, yv))
    xi, yi = xi.astype(int), yi.astype(int)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.full_like(x, 128)
    out[ok] = x[yi[ok], xi[ok]]
    return out


@pytest.mark.parametrize("magnitude,expected", [
    (5, {"Rotate": 15.0, "ShearX": 0.15, "TranslateX": 50.0, "Color": 1.0, "Posterize": 2,
         "Solarize": 128, "SolarizeAdd": 55, "Cutout": 20}),
    (10, {"Rotate": 30.0, "ShearX": 0.3, "TranslateX": 100.0, "Color": 1.9, "Posterize": 4,
          "Solarize": 256, "SolarizeAdd": 110, "Cutout": 40}),
    (15, {"Rotate": 45.0, "ShearX": 0.45, "TranslateX": 150.0, "Color": 2.8, "Posterize": 6,
          "Solarize": 384, "SolarizeAdd": 165, "Cutout": 60}),
])
def test_magnitudes_are_deepminds_level_to_arg(magnitude, expected):
    """translate_const 100, cutout_const 40, _MAX_LEVEL 10 (distort_image_with_randaugment)."""
    for name, value in expected.items():
        assert ra.level_arg(name, magnitude) == pytest.approx(value), name
    # at F0's magnitude 5 the four blends are the identity: DeepMind's blend returns the image
    assert ra.level_arg("Sharpness", 5) == 1.0 == ra.level_arg("Brightness", 5)


def test_draws_pick_ops_uniformly_with_random_signs_and_a_cutout_box():
    rng = random.Random(0)
    drawn = [op for _ in range(4000) for op in ra.draw_ops(rng, 4, 15, (192, 192))]
    counts = collections.Counter(op.name for op in drawn)
    assert set(counts) == set(ra.OPS)
    assert all(850 < c < 1150 for c in counts.values()), counts      # 1000 each
    rotations = [op.arg for op in drawn if op.name == "Rotate"]
    assert set(rotations) == {45.0, -45.0} and 0.4 < np.mean([r > 0 for r in rotations]) < 0.6
    boxes = [op.box for op in drawn if op.name == "Cutout"]
    for top, bottom, left, right in boxes:                           # 120 px at 15, clipped
        assert 0 <= top < bottom <= 192 and 0 <= left < right <= 192
        assert bottom - top <= 120 and right - left <= 120
    assert any(b[1] - b[0] == 120 for b in boxes) and any(b[0] == 0 for b in boxes)


def test_cutout_fills_its_box_with_128_and_nothing_else():
    x = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    op = ra.Op("Cutout", 6.0, (2, 14, 20, 30))
    for out in (ra.apply_cpu(x, [op]), ra.apply_batch(torch.from_numpy(x)[None], [[op]])[0].numpy()):
        assert (out[2:14, 20:30] == 128).all()
        mask = np.ones(x.shape[:2], bool)
        mask[2:14, 20:30] = False
        assert np.array_equal(out[mask], x[mask])


def test_sequences_are_the_same_on_the_cpu_and_batched():
    """Four-layer sequences (the CPU composes runs of table operations; the device applies each
    layer batched over images whose operations differ): identical pixels."""
    rng = np.random.default_rng(1)
    images = [GOLDEN[f"input_{k}"] for k in range(4)]
    batch = torch.from_numpy(rng.integers(0, 256, (24, 40, 48, 3), dtype=np.uint8))
    for magnitude in (5, 10, 15):
        ops = [ra.draw_ops(random.Random(magnitude * 100 + i), 4, magnitude, (40, 48))
               for i in range(len(batch))]
        together = ra.apply_batch(batch, ops)
        for i in range(len(batch)):
            assert np.array_equal(together[i].numpy(), ra.apply_cpu(batch[i].numpy(), ops[i])), i
        for t, x in enumerate(images):
            seq = ra.draw_ops(random.Random(t), 4, magnitude, x.shape[:2])
            got = ra.apply_batch(torch.from_numpy(x)[None], [seq])[0].numpy()
            assert np.array_equal(ra.apply_cpu(x, seq), got), [o.name for o in seq]


def test_table_runs_compose_exactly():
    """Equalize after Solarize uses the histogram of the solarized image: the composed table
    equals applying them one by one."""
    x = GOLDEN["input_2"]
    ops = [ra.Op("Solarize", 128.0), ra.Op("Equalize"), ra.Op("Posterize", 4.0),
           ra.Op("AutoContrast"), ra.Op("Invert")]
    one_by_one = x
    for op in ops:
        one_by_one = ra.apply_cpu(one_by_one, [op])
    assert np.array_equal(ra.apply_cpu(x, ops), one_by_one)
