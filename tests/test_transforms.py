"""Augmentation as DeepMind trains: MixUp on one half and CutMix on the other half of each batch,
RandAugment with every chosen op applied at magnitudes above timm's default cap."""
import numpy as np
import pytest
import torch

from conftest import ROOT
from pipeline.data.transforms import mix_batch, mixed_cross_entropy, randaugment_spec, train_transform
from pipeline.recipe import load_recipe


def _batch(n=8, size=16):
    # image i is constant i+1: mixing partners are recognisable from pixel values
    x = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    return x, torch.arange(n)


def test_mixup_first_half_cutmix_second_half():
    x, y = _batch()
    out, ya, yb, ratio = mix_batch(x, y, 0.2, 1.0, np.random.default_rng(0))
    n = len(y)
    assert torch.equal(ya, y) and torch.equal(yb, y.flip(0))          # partner: the batch reversed
    for i in range(n // 2):                                           # MixUp: a uniform blend
        lam = ratio[i].item()
        expected = lam * (i + 1) + (1 - lam) * (n - i)
        assert torch.allclose(out[i], torch.full_like(out[i], expected), atol=1e-5)
    for i in range(n // 2, n):                                        # CutMix: a box of own pixels
        own = (out[i] == i + 1).float().mean().item()
        other = (out[i] == n - i).float().mean().item()
        assert own + other == pytest.approx(1.0)
        assert ratio[i].item() == pytest.approx(own, abs=1e-6)       # label weight = box area


def test_mix_ratios_follow_the_configured_distributions():
    x, y = _batch(n=4000, size=32)
    _, _, _, r = mix_batch(x, y, 0.2, 1.0, np.random.default_rng(1))
    mix, cut = r[:2000].numpy(), r[2000:].numpy()
    # Beta(0.2, 0.2) piles up near 0 and 1
    assert ((mix < 0.1) | (mix > 0.9)).mean() > 0.6
    # CutMix: box side sqrt(1 - U(0, 1)) at a uniform centre, clipped at the image border as in
    # DeepMind's cutmix_padding, so the kept area averages about 0.3 rather than 0.5
    assert 0.2 < cut.mean() < 0.4 and cut.std() > 0.15 and cut.max() > 0.8


def test_mixing_off_or_one_kind_only():
    x, y = _batch()
    out, ya, yb, r = mix_batch(x, y, 0.0, 0.0, np.random.default_rng(0))
    assert out is x and torch.equal(r, torch.ones(8))
    out, _, _, r = mix_batch(x, y, 0.0, 1.0, np.random.default_rng(0))     # CutMix on all
    assert all(set(out[i].unique().tolist()) <= {i + 1.0, 8.0 - i} for i in range(8))
    out, _, _, r = mix_batch(x, y, 0.2, 0.0, np.random.default_rng(0))     # MixUp on all
    assert all(torch.allclose(out[i], r[i] * (i + 1) + (1 - r[i]) * (8 - i)) for i in range(8))
    same = mix_batch(x, y, 0.2, 1.0, np.random.default_rng(5))[0]
    assert torch.equal(same, mix_batch(x, y, 0.2, 1.0, np.random.default_rng(5))[0])  # seeded


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
