"""The GPU data path (loader.decode: device), run on the CPU: the same random parameters as
timm's CPU transform for every sample, and nearly the same pixels."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data.auto_augment import _RAND_TRANSFORMS

from conftest import ROOT
from pipeline.data.device_aug import DeviceAugment
from pipeline.data.manifest import load_split
from pipeline.data.reader import Cursor, TrainStreams, concat_batches, pack_jpegs
from pipeline.data.transforms import train_augment, train_transform
from pipeline.recipe import load_recipe

AUG = load_recipe(ROOT / "recipes" / "f3.yaml").pretrain.augment     # RA 4 layers, magnitude 15


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_sample_image("china.jpg")).resize((160, 120), Image.BICUBIC)


def _cpu_draws(transform, img, seed):
    """Run timm's CPU transform as the reader does, recording the crop box and RA op args."""
    rrc, flip, ra = transform.transforms[:3]
    seen = {"ops": []}
    get_params, flip_forward = rrc.get_params, flip.forward

    def record_flip(im):
        out = flip_forward(im)                   # torchvision draws torch.rand(1) < p here
        seen["flip"] = out is not im
        return out
    flip.forward = record_flip

    def record_box(*a, **k):
        seen["box"] = get_params(*a, **k)
        return seen["box"]
    rrc.get_params = record_box
    fns = {}
    for op in ra.ops:
        fns[op] = op.aug_fn
        op.aug_fn = (lambda name, fn: lambda im, *args, **kw: (seen["ops"].append((name, args)),
                                                                fn(im, *args, **kw))[1])(op.name, op.aug_fn)
    try:
        random.seed(seed)
        torch.manual_seed(seed)
        np.random.seed(seed)
        transform(img)
    finally:
        rrc.get_params, flip.forward = get_params, flip_forward
        for op, fn in fns.items():
            op.aug_fn = fn
    return seen


def test_same_crops_flips_and_ops_as_the_cpu_path(photo):
    transform = train_transform(96, AUG)
    dev = DeviceAugment(96, AUG, "cpu")
    areas_cpu, areas_dev, flips = [], [], []
    for seed in range(300):
        cpu = _cpu_draws(transform, photo, seed)
        p = dev.params(seed, photo.height, photo.width)
        assert p.box == tuple(cpu["box"]), seed
        assert p.ops == cpu["ops"], seed
        assert p.flip == cpu["flip"], seed
        flips.append(p.flip)
        areas_cpu.append(cpu["box"][2] * cpu["box"][3] / (photo.width * photo.height))
        areas_dev.append(p.box[2] * p.box[3] / (photo.width * photo.height))
    assert areas_cpu == areas_dev                       # the crop-size distribution, identical
    assert 0.08 <= min(areas_dev) and max(areas_dev) <= 1.0 and np.std(areas_dev) > 0.1
    assert 100 < sum(flips) < 200                       # about half flipped


@pytest.mark.parametrize("name", _RAND_TRANSFORMS)
def test_each_randaugment_op_matches_pil(photo, name):
    dev = DeviceAugment(96, AUG, "cpu")
    op = next(o for o in dev.ra.ops if o.name == name)
    img = photo.resize((96, 96), Image.BICUBIC)
    random.seed(3)
    args = op.level_fn(op.magnitude, op.hparams) if op.level_fn else ()
    ref = torch.from_numpy(np.array(op.aug_fn(img, *args, **op.kwargs))).permute(2, 0, 1).float()
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous()
    got = dev._apply(name, args, x)[0].float()
    geometric = name.startswith(("Rotate", "Shear", "Translate"))
    # colour ops: within rounding; geometric ops: bicubic kernels and edges differ from PIL's
    assert (ref - got).abs().mean() < (3.0 if geometric else 1.0), name


def test_whole_batch_close_to_the_cpu_transform(photo):
    import io
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=95)
    raw = buf.getvalue()
    jpeg, offsets = pack_jpegs([raw] * 8)
    seeds = list(range(100, 108))
    got = DeviceAugment(96, AUG, "cpu")(jpeg, offsets, seeds).float()
    transform = train_transform(96, AUG)
    decoded = Image.open(io.BytesIO(raw)).convert("RGB")
    diffs = []
    for i, s in enumerate(seeds):
        random.seed(s)
        torch.manual_seed(s)
        np.random.seed(s)
        ref = transform(decoded).float()
        diffs.append((ref - got[i]).abs().mean().item())
    # decode (libjpeg-turbo vs torchvision), resize and affine kernels differ; content is the same
    assert np.median(diffs) < 12, diffs


def test_raw_batches_from_the_reader_decode_to_the_right_shapes(demo_shards):
    split = load_split(demo_shards["pretrain"], "train")
    no_mixing = load_recipe(ROOT / "recipes" / "f3.yaml",
                            ["pretrain.augment.mixup_alpha=0", "pretrain.augment.cutmix_alpha=0"])
    ds = TrainStreams(split, train_augment(32, no_mixing.pretrain.augment), seed=0, block=64,
                      cursor=Cursor(0, 0, 2), rank=0, world=1, workers=2, sub_batch=4,
                      on_device=True)
    parts = [next(ds.iter_worker(k)) for k in range(2)]
    batch = concat_batches(parts)
    assert len(batch["seed"]) == 8 and batch["offsets"][-1] == len(batch["jpeg"])
    out = DeviceAugment(32, AUG, "cpu")(batch["jpeg"], batch["offsets"], batch["seed"])
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.uint8
    # the second part's first image decodes from its own bytes after the offset shift
    first_b = DeviceAugment(32, AUG, "cpu")(parts[1]["jpeg"], parts[1]["offsets"], parts[1]["seed"])
    assert torch.equal(out[4:], first_b)
