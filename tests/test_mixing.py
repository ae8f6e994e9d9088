"""DeepMind's mixed examples (pipeline/data/mixing.py) on both data paths: the CPU loader worker
(`loader.decode: cpu`) and the device path (`decode: device`, run here on the CPU device)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from conftest import ROOT
from pipeline.data.device_aug import DeviceAugment
from pipeline.data.manifest import load_split
from pipeline.data.mixing import MixPlan, apply_plan, example_seed, images_per_example, make_plan, quantize
from pipeline.data.reader import Cursor, TrainStreams, iter_order, sample_seed
from pipeline.data.transforms import TrainAugment, train_augment
from pipeline.plan import make_plan as make_run_plan
from pipeline.recipe import load_recipe
from pipeline.runtime import make_accelerator
from pipeline.step import StepRunner

RECIPE = ROOT / "recipes" / "demo.yaml"
RES = 32


def augment_section(*overrides):
    return load_recipe(RECIPE, [f"pretrain.augment.{o}" for o in overrides]).pretrain.augment


DM = ("mixup_alpha=0.2", "cutmix_alpha=1.0", "mix_pairs=disjoint", "randaugment_layers=2",
      "randaugment_magnitude=9")


def test_disjoint_quarters_mixup_q1_q2_cutmix_q3_q4_each_image_once():
    plan = make_plan("disjoint", list(range(100, 116)), 0.2, 1.0, (RES, RES))   # 16 images, 8 ex.
    assert plan.a.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert plan.b.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert plan.cutmix.tolist() == [False] * 4 + [True] * 4
    assert sorted(plan.a.tolist() + plan.b.tolist()) == list(range(16))    # distinct partners
    assert ((plan.lam > 0) & (plan.lam < 1))[:4].all()
    assert (plan.box[:4] == 0).all() and (plan.box[4:, 1] >= plan.box[4:, 0]).all()
    inb = make_plan("in_batch", list(range(8)), 0.2, 1.0, (RES, RES))
    assert inb.b.tolist() == [7, 6, 5, 4, 3, 2, 1, 0] and inb.cutmix.tolist() == [False] * 4 + [True] * 4
    only_cut = make_plan("disjoint", list(range(8)), 0.0, 1.0, (RES, RES))
    assert only_cut.cutmix.all() and only_cut.a.tolist() == [0, 1, 2, 3]
    assert images_per_example("disjoint", 0.2, 1.0) == 2
    assert images_per_example("disjoint", 0.0, 0.0) == 1 == images_per_example("in_batch", 0.2, 1.0)


def test_the_same_image_seeds_give_the_same_plan_and_different_seeds_another():
    a = make_plan("disjoint", list(range(16)), 0.2, 1.0, (RES, RES))
    b = make_plan("disjoint", list(range(16)), 0.2, 1.0, (RES, RES))
    c = make_plan("disjoint", list(range(1, 17)), 0.2, 1.0, (RES, RES))
    assert torch.equal(a.lam, b.lam) and torch.equal(a.box, b.box)
    assert not torch.equal(a.lam, c.lam)


def test_every_example_is_ratio_a_plus_rest_b_or_the_cutmix_box():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, RES, RES), dtype=torch.uint8)
    plan = make_plan("disjoint", list(range(16)), 0.2, 1.0, (RES, RES))
    mixed, ratio = apply_plan(x, plan)
    xf = x.float()
    for i in range(8):
        a, b = int(plan.a[i]), int(plan.b[i])
        if not plan.cutmix[i]:
            lam = float(plan.lam[i])
            assert float(ratio[i]) == pytest.approx(lam)
            torch.testing.assert_close(mixed[i], lam * xf[a] + (1 - lam) * xf[b])
        else:
            y1, y2, x1, x2 = plan.box[i].tolist()
            inside = torch.zeros(RES, RES, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert float(ratio[i]) == pytest.approx((y2 - y1) * (x2 - x1) / RES**2)
            assert torch.equal(mixed[i][:, inside], xf[a][:, inside])
            assert torch.equal(mixed[i][:, ~inside], xf[b][:, ~inside])


def test_mix_ratios_follow_deepminds_distributions():
    plan = make_plan("disjoint", list(range(8000)), 0.2, 1.0, (RES, RES))   # 2000 + 2000 examples
    _, ratio = apply_plan(torch.zeros(8000, 1, RES, RES), plan)
    mix, cut = ratio[:2000].numpy(), ratio[2000:].numpy()
    assert ((mix < 0.1) | (mix > 0.9)).mean() > 0.6                 # Beta(0.2, 0.2): near 0 and 1
    # CutMix: box side sqrt(1 - U(0, 1)) at a uniform centre, clipped at the image border as in
    # DeepMind's cutmix_padding, so the box area averages about 0.3 rather than 0.5
    assert 0.2 < cut.mean() < 0.4 and cut.std() > 0.15 and cut.max() > 0.8


def test_mixed_pixels_go_back_to_uint8_by_clipping_and_truncating():
    x = torch.tensor([11.5, 11.99, -3.0, 300.0, 254.7])
    assert quantize(x).tolist() == [11, 11, 0, 255, 254]          # DeepMind: clip, then cast


@pytest.fixture(scope="module")
def split(demo_shards):
    return load_split(demo_shards["pretrain"], "train")


def samples(split, n, seed=0):
    """The first n (epoch, order index, raw sample) of one stream, as a worker reads them."""
    out = []
    for idx, raw in iter_order(split, seed, 0, 64, [(0, n)]):
        out.append((0, idx, raw))
    return out


def streams(split, aug, on_device=False):
    return TrainStreams(split, aug, seed=0, block=64, cursor=Cursor(0, 0, 1), rank=0, world=1,
                        workers=1, sub_batch=8, on_device=on_device)


def solarize_only(aug: TrainAugment) -> TrainAugment:
    """The recipe's augmentation with RandAugment reduced to Solarize: a threshold, so its result
    depends on whether it runs before or after mixing."""
    ra = rand_augment_transform("rand-m9-n1-mmax10-p1.0", {"img_mean": (124, 116, 104)},
                                transforms=["Solarize"])
    aug.randaugment = ra
    return aug


def test_cpu_worker_mixes_first_then_randaugments_each_example(split):
    after = solarize_only(train_augment(RES, augment_section(*DM, "randaugment_order=after_mix")))
    before = solarize_only(train_augment(RES, augment_section(*DM, "randaugment_order=before_mix")))
    raws = samples(split, 16)
    got = streams(split, after).make_fetch(raws)
    assert got["image"].shape == (8, 3, RES, RES) and len(got["key"]) == 16
    # the same chunk without RandAugment: the crops and flips, and the plan
    plain = streams(split, train_augment(RES, augment_section(*DM, "randaugment_layers=0"))) \
        .make_fetch(raws)
    plan = MixPlan.from_dict(plain)
    seeds = [sample_seed(0, 0, idx) for _, idx, _ in raws]
    assert "ratio" not in plain                                # not mixed yet: the plan is
    mixed, ratio = apply_plan(plain["image"], plan)
    expected = []
    for i in range(8):
        es = example_seed(seeds[int(plan.a[i])])
        random.seed(es)
        np.random.seed(es)
        torch.manual_seed(es)
        pil = Image.fromarray(quantize(mixed[i]).permute(1, 2, 0).numpy())
        expected.append(torch.from_numpy(np.array(after.randaugment(pil))).permute(2, 0, 1))
    assert torch.equal(got["image"], torch.stack(expected))
    torch.testing.assert_close(got["ratio"], ratio)
    assert torch.equal(got["label"], plain["label"][plan.a])
    assert torch.equal(got["label_b"], plain["label"][plan.b])
    # the other order: RandAugment on each image, then mixing (on the device): different pixels
    pre = streams(split, before).make_fetch(raws)
    pre_mixed, _ = apply_plan(pre["image"], MixPlan.from_dict(pre))
    differ = [not torch.equal(quantize(pre_mixed[i]), got["image"][i]) for i in range(8)]
    assert sum(differ) >= 4, differ


def test_device_path_makes_the_same_examples_from_the_same_bytes(split):
    """`loader.decode: device`: the worker passes 2n JPEGs, their seeds and the plan; the step
    decodes, crops, flips, mixes, then runs RandAugment on the mixed examples. Pixels differ from
    the CPU path only by the resize and RA implementations (torch vs PIL)."""
    section = load_recipe(RECIPE, [f"pretrain.augment.{o}" for o in DM] + [
        "pretrain.augment.randaugment_order=after_mix", f"pretrain.train_res={RES}",
        f"pretrain.test_res={RES}", "pretrain.global_batch=8", "pretrain.micro_batch=8"]).pretrain
    aug = train_augment(RES, section.augment)
    raws = samples(split, 16)
    cpu = streams(split, aug).make_fetch(raws)
    dev_fetch = streams(split, aug, on_device=True).make_fetch(raws)
    assert "jpeg" in dev_fetch and len(dev_fetch["seed"]) == 16 and "mix_a" in dev_fetch
    acc = make_accelerator("fp32")
    plan = make_run_plan(section, 1000, 1)
    runner = StepRunner(acc, None, None, None, None, section, plan, iter(()),
                        device_aug=DeviceAugment(RES, section.augment, torch.device("cpu")))
    x_dev, ya, yb, r = runner.inputs(dev_fetch)
    x_cpu, ya_cpu, yb_cpu, r_cpu = StepRunner(acc, None, None, None, None, section, plan,
                                              iter(())).inputs(cpu)
    assert torch.equal(ya, ya_cpu) and torch.equal(yb, yb_cpu)
    torch.testing.assert_close(r, r_cpu)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    grey_levels = ((x_dev - x_cpu) * std).abs()
    print(f"device vs CPU path: {grey_levels.mean():.2f} grey levels on average")
    assert grey_levels.mean() < 2, grey_levels.mean()          # measured 0.53 (resize, RA ops)


def test_a_fetch_reads_two_images_per_example(split):
    aug = train_augment(RES, augment_section(*DM))
    ds = streams(split, aug)
    fetch = next(ds.iter_worker(0))
    assert len(fetch["key"]) == 16 == len(set(fetch["key"])) and fetch["image"].shape[0] == 16
    assert MixPlan.from_dict(fetch).a.shape == (8,)
