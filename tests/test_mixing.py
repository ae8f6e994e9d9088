"""MixUp and CutMix as DeepMind forms them (pipeline/data/mixing.py): which images pair, which
examples are CutMix at every batch layout (the F6 / F7 layout included), the ratio and box
distributions, and the pixels, the same on the CPU and batched on the device."""
import dataclasses
import random

import numpy as np
import pytest
import torch

from conftest import ROOT
from pipeline.data.examples import ExampleRecipe
from pipeline.data.manifest import load_split
from pipeline.data.mixing import (
    MixDraw,
    draw_mix,
    images_per_example,
    is_cutmix,
    mix,
    mix_into,
    partners,
    quantize,
)
from pipeline.data.reader import Cursor, StreamLayout, TrainStreams
from pipeline.recipe import load_recipe

RES = 32


def test_disjoint_pairs_read_each_image_once_in_batch_pairs_reverse_the_chunk():
    assert partners("disjoint", 8) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert partners("in_batch", 4) == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert partners("in_batch", 1) == [(0, 0)]                      # one image: mixed with itself
    with pytest.raises(ValueError, match="even number"):
        partners("disjoint", 3)
    assert images_per_example("disjoint", 0.2, 1.0) == 2
    assert images_per_example("disjoint", 0.0, 0.0) == 1 == images_per_example("in_batch", 0.2, 1.0)


def test_the_kind_follows_the_examples_place_in_its_stream_not_its_chunk():
    assert [is_cutmix(0, n, 0.2, 1.0) for n in range(4)] == [False, True, False, True]
    assert [is_cutmix(1, n, 0.2, 1.0) for n in range(4)] == [True, False, True, False]
    assert not any(is_cutmix(s, n, 0.2, 0.0) for s in range(3) for n in range(5))   # MixUp only
    assert all(is_cutmix(s, n, 0.0, 1.0) for s in range(3) for n in range(5))       # CutMix only


def kinds_per_micro_batch(world: int, workers: int, micro: int, steps: int) -> list[list[bool]]:
    """The kind of every example of `steps` global micro-batches, made the way the workers make
    them: each worker's fetch draws its examples from its streams' positions."""
    layout = StreamLayout.for_run(micro, world, workers)
    out = []
    for step in range(steps):
        kinds = []
        for stream in range(layout.num_streams):
            for j in range(layout.sub_batch):                   # the stream's examples in order
                number = step * layout.sub_batch + j
                kinds.append(is_cutmix(stream, number, 0.2, 1.0))
        out.append(kinds)
    return out


@pytest.mark.parametrize("world,workers,micro", [
    (8, 8, 8),        # F6 / F7 on 8 processes: one example per fetch
    (1, 1, 1),        # a one-example chunk on one process
    (8, 8, 256),      # F0 on 8 processes
    (3, 2, 6),
])
def test_half_of_every_micro_batch_is_cutmix_at_every_layout(world, workers, micro):
    """DeepMind: half of each batch MixUp, half CutMix. Here exactly half of every global
    micro-batch with an even number of examples (and within one of half when it is odd, the
    extra alternating), whatever the processes, workers and micro-batch."""
    batches = kinds_per_micro_batch(world, workers, micro, steps=6)
    for kinds in batches:
        n = len(kinds)
        assert abs(sum(kinds) - n / 2) <= 0.5, (world, workers, micro, sum(kinds), n)
    total = [k for b in batches for k in b]
    assert abs(np.mean(total) - 0.5) <= 1 / len(total)


def test_the_workers_fetches_make_the_kinds_and_the_same_examples_anywhere(demo_shards):
    """Real fetches at a one-example-per-fetch layout (the old per-chunk rule made every such
    example MixUp), and the same examples when the streams map to processes differently."""
    split = load_split(demo_shards["pretrain"], "train")
    dm = load_recipe(ROOT / "recipes" / "f0.yaml").pretrain.augment
    recipe = dataclasses.replace(ExampleRecipe.of(RES, dm), ra_layers=0)

    def examples(world, workers, micro):
        layout = StreamLayout.for_run(micro, world, workers, num_streams=8)
        out = {}
        for r in range(world):
            ds = TrainStreams(split, recipe, seed=5, block=64, cursor=Cursor(0, 0, layout.num_streams),
                              rank=r, world=world, workers=workers, sub_batch=layout.sub_batch)
            for k in range(workers):
                it = ds.iter_worker(k)
                for _ in range(2):
                    b = next(it)
                    for i in range(len(b)):
                        out[b.keys[2 * i]] = (b.images[i], float(b.ratio[i]))
        return out

    one_each = examples(4, 2, 2)                   # 8 streams, one example per fetch
    ratios = [r for _, r in one_each.values()]
    cutmix_like = [r for r in ratios if r in {k / (RES * RES) for k in range(RES * RES + 1)}]
    assert 0 < len(cutmix_like) < len(ratios)      # both kinds, not all MixUp
    other = examples(1, 2, 8)                      # the same 8 streams on one process
    assert one_each.keys() == other.keys()
    assert all(torch.equal(one_each[k][0], other[k][0]) and one_each[k][1] == other[k][1]
               for k in one_each)


def test_mix_ratios_follow_deepminds_distributions():
    rng = random.Random(0)
    mixup = [draw_mix(rng, False, 0.2, 1.0, (RES, RES)).ratio for _ in range(3000)]
    cut = [draw_mix(rng, True, 0.2, 1.0, (RES, RES)) for _ in range(3000)]
    assert np.mean([(r < 0.1) | (r > 0.9) for r in mixup]) > 0.6      # Beta(0.2, 0.2)
    areas = np.array([d.ratio for d in cut])
    # box side sqrt(1 - U(0, 1)) at a uniform centre, halves truncated, clipped at the border as
    # DeepMind's cutmix_padding does: the area averages about 0.3 rather than 0.5
    assert 0.2 < areas.mean() < 0.4 and areas.std() > 0.15 and areas.max() > 0.8
    for d in cut:
        y1, y2, x1, x2 = d.box
        assert 0 <= y1 <= y2 <= RES and 0 <= x1 <= x2 <= RES
        assert d.ratio == (y2 - y1) * (x2 - x1) / RES**2


def test_every_example_is_ratio_a_plus_rest_b_or_the_cutmix_box():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 256, (8, RES, RES, 3), dtype=np.uint8))
    b = torch.from_numpy(rng.integers(0, 256, (8, RES, RES, 3), dtype=np.uint8))
    draws = [draw_mix(random.Random(i), i % 2 == 1, 0.2, 1.0, (RES, RES)) for i in range(8)]
    mixed = mix(a, b, draws)
    for i, d in enumerate(draws):
        if d.cutmix:
            y1, y2, x1, x2 = d.box
            inside = torch.zeros(RES, RES, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert torch.equal(mixed[i][inside], a[i][inside])
            assert torch.equal(mixed[i][~inside], b[i][~inside])
        else:
            lam = torch.tensor(d.ratio, dtype=torch.float32)
            expected = (lam * a[i].float() + (1 - lam) * b[i].float()).to(torch.uint8)
            assert torch.equal(mixed[i], expected)
        out = np.empty((RES, RES, 3), np.uint8)                       # the CPU worker's version
        mix_into(out, a[i].numpy(), b[i].numpy(), d)
        assert np.array_equal(out, mixed[i].numpy()), i


def test_mixup_on_the_cpu_is_the_batched_pixels_for_every_ratio():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a[0, 0], b[0, 0] = 255, 255                                       # the top of the range
    out = np.empty_like(a)
    for lam in [0.0, 1.0, 0.5, 1e-8, 1 - 1e-8, *rng.random(200)]:
        d = MixDraw(False, float(lam))
        mix_into(out, a, b, d)
        assert np.array_equal(out, mix(torch.from_numpy(a[None]), torch.from_numpy(b[None]), [d])[0].numpy())


def test_mixed_pixels_go_back_to_uint8_by_clipping_and_truncating():
    x = torch.tensor([11.5, 11.99, -3.0, 300.0, 254.7])
    assert quantize(x).tolist() == [11, 11, 0, 255, 254]          # DeepMind: clip, then cast
