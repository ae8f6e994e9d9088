"""DeepMind's Scaled Weight Standardization (pipeline/std_conv.py) against a direct float64
computation of nfnets/base.py's formula, and how close plain timm comes when rebuilt from
config.json."""
import math

import numpy as np
import pytest
import timm
import torch

from pipeline.std_conv import (
    DEEPMIND_EPS,
    TIMM_REBUILD_EPS,
    DeepMindStdConv2dSame,
    deepmind_standardize,
    use_deepmind_ws,
    uses_deepmind_ws,
)
from pipeline.variants import build_model


def reference(weight: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """nfnets/base.py WSConv2D in float64 numpy, on an OIHW weight: per output filter,
    (w - mean) * gain * rsqrt(max(fan_in * var, 1e-4)) with the population variance."""
    out = np.empty_like(weight, dtype=np.float64)
    for o in range(weight.shape[0]):
        w = weight[o].astype(np.float64)
        fan_in = w.size
        scale = 1.0 / math.sqrt(max(fan_in * w.var(), 1e-4))
        out[o] = (w - w.mean()) * scale * float(gain[o])
    return out


def test_formula_equals_deepminds_including_a_zero_variance_and_a_tiny_variance_filter():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    w[1] = 0.7                                    # zero variance: the output filter is all 0
    w[2] = 0.3 + 1e-4 * torch.randn(4, 3, 3, dtype=torch.float64)   # N*var ~ 4e-7 < 1e-4: floored
    w[3] *= 0.01                                  # small weights, as after long weight decay
    gain = torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.5
    got = deepmind_standardize(w, gain).numpy()
    want = reference(w.numpy(), gain.view(-1).numpy())
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not got[1].any()
    # the floored filter: scaled by 1/sqrt(1e-4) = 100 at most, not blown up to unit variance
    assert np.abs(got[2]).max() < 100 * 4e-4 * float(gain[2]) and DEEPMIND_EPS == 1e-4
    # timm's eps-added formula (std_conv_eps 1e-5) differs on the same weights, most on small ones
    timm_w = ((w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
        36 * (w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)) * gain).numpy()
    assert np.abs(timm_w[3] / want[3] - 1).max() > 0.03


def test_every_nfnet_variant_uses_it_and_the_state_dict_is_timms():
    model, arch, args = build_model("tiny", 5, seed=0)
    assert uses_deepmind_ws(model) and args["std_conv_eps"] == TIMM_REBUILD_EPS
    convs = [m for m in model.modules() if isinstance(m, DeepMindStdConv2dSame)]
    assert len(convs) == sum(1 for k in model.state_dict() if k.endswith(".gain"))
    plain = timm.create_model(arch, num_classes=5, **args)
    assert not uses_deepmind_ws(plain)
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    bn, _, _ = build_model("tiny_bn", 5)
    assert not uses_deepmind_ws(bn)                        # BN baselines have no WS convs


def test_plain_timm_rebuilt_from_config_json_comes_within_float_rounding():
    """What a timm user gets from config.json (std_conv_eps 1e-10) against ours (exact)."""
    ours, arch, args = build_model("tiny", 5, seed=0)
    plain = timm.create_model(arch, num_classes=5, **args)
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():                                  # trained-like weights: nonzero gains
        for name, p in ours.named_parameters():
            if name.endswith("skipinit_gain"):
                p.fill_(0.5)
        plain.load_state_dict(ours.state_dict())
        x = torch.randn(4, 3, 32, 32)
        a, b = ours.eval()(x), plain.eval()(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    use_deepmind_ws(plain)
    with torch.no_grad():
        assert torch.equal(plain(x), ours(x))


@pytest.mark.parametrize("variant", ["f0", "f4+"])
def test_the_f_variants_build_with_it_on_the_meta_device(variant):
    model, _, args = build_model(variant, 1000, device="meta")
    assert uses_deepmind_ws(model) and args["std_conv_eps"] == TIMM_REBUILD_EPS
