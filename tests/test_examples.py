"""How a training example is made (pipeline/data/examples.py), on both paths: the CPU loader worker
(`loader.decode: cpu`) and the device path (`decode: device`, run here on the CPU device). The
same draws make the same examples; the paths differ only by the JPEG decoder and resize kernels."""
import dataclasses
import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data.transforms import RandomResizedCropAndInterpolation

from conftest import ROOT
from pipeline.data import examples
from pipeline.data import randaugment as ra
from pipeline.data import resize as resize_mod
from pipeline.data.batch import Batch, Encoded
from pipeline.data.examples import ExampleRecipe, SampleInfo, draw, draw_image, image_cpu
from pipeline.data.manifest import load_split
from pipeline.data.prefetch import prepare
from pipeline.data.reader import Cursor, StreamSample, TrainStreams, iter_order, sample_seed
from pipeline.data.resize import crop_flip, resample_weights
from pipeline.recipe import load_recipe

F3 = load_recipe(ROOT / "recipes" / "f3.yaml").pretrain.augment     # RA 4 layers, magnitude 15
DM = ExampleRecipe.of(32, F3)                                        # disjoint, RA after mixing


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_sample_image("china.jpg")).resize((160, 120), Image.BICUBIC)


@pytest.fixture(scope="module")
def big_photo():
    return Image.fromarray(load_sample_image("china.jpg"))          # 640 x 427: crops downscale


@pytest.fixture(scope="module")
def split(demo_shards):
    return load_split(demo_shards["pretrain"], "train")


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def recipe_with(**changes) -> ExampleRecipe:
    return dataclasses.replace(DM, **changes)


def samples(split, n: int, stream: int = 0) -> list[StreamSample]:
    return [StreamSample(stream, 0, idx, pos, raw)
            for pos, (idx, raw) in enumerate(iter_order(split, 0, 0, 64, [(0, n)]))]


def fetch(split, recipe: ExampleRecipe, on_device: bool = False, n: int = 16):
    ds = TrainStreams(split, recipe, seed=0, block=64, cursor=Cursor(0, 0, 1), rank=0, world=1,
                      workers=1, sub_batch=n // recipe.images_per_example, on_device=on_device)
    return ds.make_fetch(samples(split, n))


def test_the_crop_is_timms_random_resized_crop_from_the_images_own_seed(photo):
    """The same boxes as timm's RandomResizedCropAndInterpolation given the same seed, without
    touching the global generators (a prefetch thread draws beside the training thread)."""
    rrc = RandomResizedCropAndInterpolation(96, scale=(0.08, 1.0))
    state = random.getstate()
    ours = [examples.inception_crop(random.Random(s), photo.height, photo.width, (0.08, 1.0))
            for s in range(300)]
    assert random.getstate() == state
    timms = []
    for s in range(300):
        random.seed(s)
        timms.append(tuple(rrc.get_params(photo, rrc.scale, rrc.ratio)))
    assert ours == timms
    areas = [h * w / (photo.width * photo.height) for _, _, h, w in ours]
    assert 0.08 <= min(areas) and max(areas) <= 1.0 and np.std(areas) > 0.1
    # a long thin image misses ten times and falls back to the centre with the aspect clamped
    assert examples.inception_crop(random.Random(0), 10, 400, (0.9, 1.0)) == (0, 193, 10, 13)


def test_an_images_draw_depends_on_its_seed_and_size_only():
    a = draw_image(DM, 123, 300, 400)
    assert a == draw_image(DM, 123, 300, 400) and a != draw_image(DM, 124, 300, 400)
    flips = [draw_image(DM, s, 300, 400).crop[4] for s in range(400)]
    assert 150 < sum(flips) < 250                                 # about half flipped
    no_flip = recipe_with(hflip=False)
    assert not any(draw_image(no_flip, s, 300, 400).crop[4] for s in range(50))
    assert a.ops == [] and draw_image(recipe_with(ra_order="before_mix"), 123, 300, 400).ops


def test_a_fetch_reads_two_images_per_example_and_pairs_them_within_each_stream():
    infos = [SampleInfo(s, s // 8, s % 8) for s in range(16)]       # two streams of 8 images
    images = [draw_image(DM, i.seed, 100, 120) for i in infos]
    d = draw(DM, infos, images, per_stream=8)
    assert d.pairs == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]
    assert [m.cutmix for m in d.mixes] == [False, True, False, True, True, False, True, False]
    assert len(d.ops) == 8 and all(len(o) == 4 for o in d.ops)   # RA per example, 4 layers
    inb = draw(recipe_with(pairs="in_batch"), infos, images, per_stream=8)
    assert inb.pairs[:8] == [(j, 7 - j) for j in range(8)]


def test_cpu_examples_are_the_draws_applied_mix_then_randaugment(split):
    """A fetch's examples equal the crops, mixed by the drawn boxes and ratios, then each
    example's drawn RandAugment: the recipe's order, with nothing else in between."""
    got = fetch(split, DM)
    assert isinstance(got, Batch) and got.images.shape == (8, 32, 32, 3) and len(got.keys) == 16
    plain = fetch(split, recipe_with(ra_layers=0))                   # the same draws, no RA
    again = fetch(split, DM)
    assert torch.equal(got.images, again.images)                     # deterministic
    assert torch.equal(got.ratio, plain.ratio) and torch.equal(got.labels_b, plain.labels_b)
    raws = samples(split, 16)
    infos = [SampleInfo(sample_seed(0, s.epoch, s.index), 0, s.position) for s in raws]
    images = [draw_image(DM, i.seed, *_size(r.raw)) for i, r in zip(infos, raws)]
    d = draw(DM, infos, images, per_stream=16)
    for i in range(8):
        expected = ra.apply_cpu(plain.images[i].numpy(), d.ops[i])
        assert np.array_equal(got.images[i].numpy(), expected), i
    before = fetch(split, recipe_with(ra_order="before_mix"))
    differ = [not torch.equal(before.images[i], got.images[i]) for i in range(8)]
    assert sum(differ) >= 4                                          # the order matters


def _size(raw: dict) -> tuple[int, int]:
    img = Image.open(io.BytesIO(raw["jpg"]))
    return img.height, img.width


@pytest.mark.parametrize("order", ["after_mix", "before_mix"])
@pytest.mark.parametrize("pairs", ["disjoint", "in_batch"])
def test_the_device_path_makes_the_same_examples_from_the_same_bytes(split, pairs, order):
    """The worker passes the JPEG bytes and the draws; the device decodes, crops, mixes and
    augments: labels, ratios and keys identical, pixels within the decoder and resize kernels."""
    recipe = recipe_with(pairs=pairs, ra_order=order)
    cpu = fetch(split, recipe)
    enc = fetch(split, recipe, on_device=True)
    assert isinstance(enc, Encoded) and enc.offsets[-1] == len(enc.jpeg)
    dev = prepare(enc, recipe, torch.device("cpu"))
    assert torch.equal(dev.labels, cpu.labels) and torch.equal(dev.labels_b, cpu.labels_b)
    assert torch.equal(dev.ratio, cpu.ratio) and dev.keys == cpu.keys
    grey_levels = (dev.images.float() - cpu.images.float()).abs()
    print(f"{pairs} {order}: device vs CPU path {grey_levels.mean():.3f} grey levels on average")
    # measured 0.007-0.02: whole-level rounding of the resize, through RandAugment's thresholds
    assert grey_levels.mean() < 0.25, grey_levels.mean()


def test_encoded_fetches_concatenate_into_one_micro_batch(split):
    ds = TrainStreams(split, DM, seed=0, block=64, cursor=Cursor(0, 0, 2), rank=0, world=1,
                      workers=2, sub_batch=2, on_device=True)
    parts = [next(ds.iter_worker(k)) for k in range(2)]
    both = Encoded.concat(parts)
    assert both.offsets[-1] == len(both.jpeg) and len(both.draws.crops) == 8
    assert both.draws.pairs == [(0, 1), (2, 3), (4, 5), (6, 7)]
    made = prepare(both, DM, torch.device("cpu"))
    alone = [prepare(p, DM, torch.device("cpu")) for p in parts]
    assert torch.equal(made.images, torch.cat([a.images for a in alone]))
    assert made.keys == alone[0].keys + alone[1].keys


def test_timms_randaugment_is_the_other_choice_on_the_cpu(split):
    timm_ra = recipe_with(ra_ops="timm")
    a, b = fetch(split, timm_ra), fetch(split, timm_ra)
    assert torch.equal(a.images, b.images)                           # seeded per example
    assert not torch.equal(a.images, fetch(split, DM).images)
    from pipeline.recipe import RecipeError
    with pytest.raises(RecipeError, match="CPU path only"):
        load_recipe(ROOT / "recipes" / "f0.yaml", ["pretrain.augment.randaugment_ops=timm",
                                                  "pretrain.loader.decode=device"])


def test_a_sample_whose_pixels_do_not_decode_is_replaced_by_its_neighbour(split):
    raws = samples(split, 16)
    broken = dict(raws[5].raw, jpg=raws[5].raw["jpg"][:400])        # header reads, pixels do not
    raws[5] = raws[5]._replace(raw=broken)
    ds = TrainStreams(split, DM, seed=0, block=64, cursor=Cursor(0, 0, 1), rank=0, world=1,
                      workers=1, sub_batch=8)
    got = ds.make_fetch(raws)
    assert [b.key for b in got.bad] == [broken["__key__"]]
    assert got.bad[0].replaced_by == raws[4].raw["__key__"] and "decoded" in got.bad[0].reason
    assert got.images.shape == (8, 32, 32, 3)


def test_a_batch_moves_to_a_device_and_concatenates_field_by_field():
    b = Batch.unmixed(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.tensor([1, 2]), ["a", "b"],
                      torch.tensor([0, 1]))
    assert torch.equal(b.labels_b, b.labels) and b.ratio.tolist() == [1.0, 1.0]
    both = Batch.concat([b, b])
    assert len(both) == 4 and both.keys == ["a", "b", "a", "b"] and both.images.shape[0] == 4
    assert both.to(torch.device("cpu")).labels.tolist() == [1, 2, 1, 2]


# ------------------------------------------------------------------------------------------------
# Batched crops on the device: PIL's resampling as two matrix products for the whole batch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res", [96, 192])
def test_batched_crops_are_pils_crops(photo, big_photo, res):
    """The device crops against the CPU path's (PIL crop, bicubic resize with antialias, flip) on
    the same decoded photo and draws: upscaled crops (160 x 120) and downscaled ones (640 x 427)."""
    recipe = recipe_with(res=res, ra_layers=0)
    for photo_ in (photo, big_photo):
        buf = io.BytesIO()
        photo_.save(buf, "JPEG", quality=95)
        img = Image.open(buf)
        draws = [draw_image(recipe, s, img.height, img.width) for s in range(32)]
        got = crop_flip([_chw(img)] * 32, [d.crop for d in draws], res, "bicubic").float()
        ref = torch.stack([torch.from_numpy(np.array(image_cpu(recipe, buf.getvalue(), d)))
                           for d in draws]).float()
        diffs = (ref - got).abs().mean(dim=(1, 2, 3))
        # measured 0.0005-0.02 grey levels on average (rounding; this machine's Pillow build
        # sometimes resizes vertically first: up to 0.25 on those crops). Before: per-image
        # antialiased bicubic interpolate 0.15; torchvision.ops.roi_align (bilinear) 1.5-1.7
        assert diffs.mean() < 0.1 and diffs.max() < 0.5, (img.size, res, diffs)
    flips = [d.crop[4] for d in draws]
    assert any(flips) and not all(flips)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_differently_sized_images_in_one_batch_crop_as_each_alone(photo, big_photo, monkeypatch):
    """Decoded images of different sizes are zero-padded into one batch (or split into chunks of
    similar sizes): the zeros get no weight, so every crop equals its image's crop alone."""
    images = [_chw(photo), _chw(big_photo), _chw(photo.resize((90, 150))), _chw(big_photo)]
    crops = [draw_image(DM, s, img.shape[1], img.shape[2]).crop for s, img in enumerate(images)]
    alone = torch.cat([crop_flip([img], [c], 64, "bicubic") for img, c in zip(images, crops)])
    assert torch.equal(crop_flip(images, crops, 64, "bicubic"), alone)
    monkeypatch.setattr(resize_mod, "PAD_BUDGET", 3 * 160 * 150 * 2)     # forces several chunks
    assert len(resize_mod._chunks([tuple(i.shape[1:]) for i in images])) > 1
    assert torch.equal(crop_flip(images, crops, 64, "bicubic"), alone)


def test_a_flip_reverses_the_columns_of_the_crop(photo):
    top, left, h, w, _ = draw_image(DM, 7, photo.height, photo.width).crop
    plain = crop_flip([_chw(photo)], [(top, left, h, w, False)], 48, "bicubic")
    flipped = crop_flip([_chw(photo)], [(top, left, h, w, True)], 48, "bicubic")
    assert torch.equal(flipped, plain.flip(2))


def test_resample_weights_are_pils_kernel_normalised_over_the_crop():
    # downscale 8 -> 4 pixels from a crop starting at 2: the kernel stretched 2x, only crop pixels
    w = resample_weights(torch.tensor([2]), torch.tensor([8]), 12, 4, "bilinear")[0]
    assert torch.allclose(w.sum(1), torch.ones(4))
    assert (w[:, :2] == 0).all() and (w[:, 10:] == 0).all()
    # output pixel 1 is centred on 2 + 1.5 * 2 = 5.0: triangle 1/4, 3/4, 3/4, 1/4, normalised
    torch.testing.assert_close(w[1, 3:7], torch.tensor([1, 3, 3, 1]) / 8)
    same = resample_weights(torch.tensor([0]), torch.tensor([6]), 6, 6, "bicubic")[0]
    torch.testing.assert_close(same, torch.eye(6))                 # scale 1: the identity
    assert math.isclose(float(w.sum()), 4.0, rel_tol=1e-6)


def test_a_crop_beyond_what_the_image_decodes_to_is_an_error_not_black_pixels(photo):
    """PIL pads a crop outside its image with black; image_cpu refuses instead, so a size misread
    from a header becomes a replaced sample, not a silently wrong example."""
    buf = io.BytesIO()
    photo.save(buf, "JPEG")                                              # 160 x 120
    inside = examples.ImageDraw((20, 10, 100, 150, False), [], None)
    assert image_cpu(recipe_with(ra_layers=0), buf.getvalue(), inside).shape == (DM.res, DM.res, 3)
    beyond = examples.ImageDraw((20, 10, 101, 150, False), [], None)    # one row too many
    with pytest.raises(ValueError, match="160 x 120 px, smaller than its header says"):
        image_cpu(recipe_with(ra_layers=0), buf.getvalue(), beyond)
