"""The variant table against the paper's parameter counts, built through timm on the meta device."""
import math

import pytest
import timm
import torch
from timm.layers import DropPath

from pipeline.variants import VARIANTS, build_model, count_params

F_VARIANTS = [f"f{i}" for i in range(8)]


@pytest.mark.parametrize("name", F_VARIANTS)
def test_parameter_counts_match_the_paper(name):
    v = VARIANTS[name]
    model, arch, _ = build_model(name, num_classes=1000, device="meta")
    assert round(count_params(model) / 1e6, 1) == v.params_m


def test_f0_to_f6_are_timms_deepmind_models():
    for i in range(7):
        model, arch, args = build_model(f"f{i}", 1000, device="meta")
        assert arch == f"dm_nfnet_f{i}" and args == {"std_conv_eps": 1e-10}   # DeepMind's WS


def test_f7_uses_the_deepmind_configuration():
    from timm.models.nfnet import model_cfgs
    model, arch, args = build_model("f7", 1000, device="meta")
    assert arch == "dm_nfnet_f6" and args == {"depths": [8, 16, 48, 24], "std_conv_eps": 1e-10}
    cfg = model_cfgs[arch]
    assert cfg.gamma_in_act and cfg.same_padding and cfg.skipinit    # unlike timm's nfnet_f7
    assert sum(len(s) for s in model.stages) == 96


def test_f4_plus_is_the_wide_transfer_model():
    model, _, args = build_model("f4+", 1000, device="meta")
    assert args["channels"] == [384, 768, 2048, 2048] and args["num_features"] == 4096
    # The paper quotes 527 M; this build gives 525.0 M (see pipeline/variants.py).
    assert abs(count_params(model) / 1e6 - 527.0) / 527.0 < 0.005


def test_width_multiplier_scales_blocks_not_stem():
    _, _, args = build_model("f0", 10, width=1.5, device="meta")
    assert args["channels"] == [384, 768, 2304, 2304] and args["stem_chs"] == 128


def test_stochastic_depth_is_deepminds_ramp_without_rescaling():
    model, _, _ = build_model("f1", 10, drop_path_rate=0.25, device="meta")
    blocks = [b for s in model.stages for b in s]
    n = len(blocks)
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)        # rate 0 for block 0
    for i, b in enumerate(blocks[1:], start=1):
        assert isinstance(b.drop_path, DropPath) and not b.drop_path.scale_by_keep
        assert b.drop_path.drop_prob == pytest.approx(0.25 * i / n)


def test_tiny_variant_trains_on_cpu():
    """Every parameter gets a gradient, and a few SGD steps on one fixed batch lower its loss
    (it starts near uniform): the tiny net can learn."""
    model, arch, args = build_model("tiny", num_classes=5, seed=0)
    assert count_params(model) < 200_000
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 48, 48), torch.arange(8) % 5
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(5)) < 0.01                    # near uniform at first
    assert losses[-1] < 0.8 * losses[0], losses
    after = model.state_dict()
    assert not torch.equal(after["head.fc.weight"], before["head.fc.weight"])
    assert not torch.equal(after["stem.conv1.weight"], before["stem.conv1.weight"])
    rebuilt = timm.create_model(arch, num_classes=5, **args)
    assert count_params(rebuilt) == count_params(model)
