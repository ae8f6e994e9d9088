"""Augmentation as DeepMind trains: RandAugment with every chosen op applied at magnitudes above
timm's default cap, the mixed loss, and timm's transform split where mixing sits (the mixed
examples themselves: tests/test_mixing.py)."""
import pytest
import torch

from conftest import ROOT
from pipeline.data.transforms import mixed_cross_entropy, randaugment_spec, train_augment, train_transform
from pipeline.recipe import load_recipe


def test_mixed_loss_weights_both_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    a, b = torch.tensor([0, 1]), torch.tensor([1, 0])
    full = mixed_cross_entropy(logits, a, b, torch.ones(2), 0.0)
    half = mixed_cross_entropy(logits, a, b, torch.full((2,), 0.5), 0.0)
    ce = torch.nn.functional.cross_entropy
    assert full.item() == pytest.approx(ce(logits, a).item())
    assert half.item() == pytest.approx(0.5 * (ce(logits, a) + ce(logits, b)).item())


@pytest.mark.parametrize("variant,mag", [("f0", 5), ("f1", 10), ("f3", 15)])
def test_randaugment_matches_deepmind_levels(variant, mag):
    aug = load_recipe(ROOT / "recipes" / f"{variant}.yaml").pretrain.augment
    assert randaugment_spec(aug.randaugment_layers, aug.randaugment_magnitude) == \
        f"rand-m{mag}-n4-mmax{max(10, mag)}-p1.0"
    t = train_transform(64, aug)
    ra = t.transforms[2]
    assert ra.num_layers == 4
    for op in ra.ops:
        assert op.prob == 1.0 and op.magnitude == mag        # every chosen op is applied ...
        assert (op.magnitude_max or 10) >= mag               # ... at the full magnitude
    assert not any("ColorJitter" in type(tr).__name__ for tr in t.transforms)


def test_the_split_transform_is_timms_whole_transform_in_three_parts():
    """crop_flip -> randaugment -> to_tensor, seeded alike, equals timm's train transform: the
    before-mix path reproduces what the single transform did."""
    import random

    import numpy as np
    from PIL import Image
    aug = load_recipe(ROOT / "recipes" / "f1.yaml").pretrain.augment
    parts, whole = train_augment(64, aug), train_transform(64, aug)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), np.uint8))
    outs = []
    for run in (lambda im: parts.to_tensor(parts.randaugment(parts.crop_flip(im))), whole):
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)
        outs.append(run(img))
    assert torch.equal(outs[0], outs[1]) and outs[0].dtype == torch.uint8
    assert parts.images_per_example == 2 and parts.ra_after_mix       # F1: DeepMind's choices
