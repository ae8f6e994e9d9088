"""AGC against a straightforward per-tensor reference, and the parameter grouping around it."""
import pytest
import torch
from torch import nn

from pipeline.agc import AGC, split_parameters, unitwise_clip_
from pipeline.variants import build_model


def reference_agc(grad: torch.Tensor, weight: torch.Tensor, whole: bool, clip: float, eps: float):
    """The paper's rule, one tensor at a time, written for clarity (float64)."""
    g, w = grad.double(), weight.double()
    if whole or g.ndim <= 1:
        g_norm, w_norm = g.norm(), w.norm()
    else:
        dims = tuple(range(1, g.ndim))
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    max_norm = w_norm.clamp(min=eps) * clip
    clipped = g * (max_norm / g_norm.clamp(min=1e-6))
    return torch.where(g_norm > max_norm, clipped, g).to(grad.dtype)


# Every shape that occurs in an NFNet: stem/body convs (grouped too), SE linears, classifier,
# WS gains (O,1,1,1), biases, scalar skip gains.
SHAPES = [((16, 3, 3, 3), False), ((128, 8, 3, 3), False), ((256, 128, 1, 1), False),
          ((768, 1536), False), ((1536, 768), False), ((10, 3072), False),
          ((256, 1, 1, 1), True), ((256,), True), ((), True), ((768,), True), ((1536, 1, 1, 1), True)]


def _tensors(seed, grad_scale=1.0, zero_weights=False):
    g = torch.Generator().manual_seed(seed)
    grads, weights, whole = [], [], []
    for shape, w in SHAPES:
        weights.append(torch.zeros(shape) if zero_weights else torch.randn(shape, generator=g) * 0.05)
        grads.append(torch.randn(shape, generator=g) * grad_scale)
        whole.append(w)
    return grads, weights, whole


@pytest.mark.parametrize("grad_scale", [1e-8, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("clip", [0.01, 0.16])
def test_matches_reference_on_every_nfnet_shape(grad_scale, clip):
    grads, weights, whole = _tensors(0, grad_scale)
    expected = [reference_agc(g, w, wh, clip, 1e-3) for g, w, wh in zip(grads, weights, whole)]
    unitwise_clip_(grads, weights, whole, clip, 1e-3)
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-12)


def test_zero_weights_use_eps():
    grads, weights, whole = _tensors(1, 1.0, zero_weights=True)
    expected = [reference_agc(g, w, wh, 0.01, 1e-3) for g, w, wh in zip(grads, weights, whole)]
    unitwise_clip_(grads, weights, whole, 0.01, 1e-3)
    for got, exp in zip(grads, expected):
        torch.testing.assert_close(got, exp)
    # every unit's norm is now clip * eps = 1e-5
    assert grads[0].flatten(1).norm(dim=1).max().item() == pytest.approx(1e-5, rel=1e-4)


def test_unclipped_units_are_untouched_and_clipped_ones_hit_the_bound():
    w = torch.ones(4, 9)                       # unit norm 3
    g = torch.zeros(4, 9)
    g[0] = 0.001                               # ratio 0.001 < 0.01: untouched
    g[1] = 10.0                                # ratio 10: clipped to norm 0.03
    before = g.clone()
    unitwise_clip_([g], [w], [False], 0.01)
    assert torch.equal(g[0], before[0]) and torch.equal(g[2:], before[2:])
    assert g[1].norm().item() == pytest.approx(0.03, rel=1e-5)
    assert torch.allclose(g[1] / g[1].norm(), before[1] / before[1].norm())


def test_channels_last_and_non_contiguous_grads():
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    g = torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last) * 10
    gt = torch.randn(16, 32).t()               # a transposed (non-contiguous) linear gradient
    wt = torch.randn(32, 16)
    exp = [reference_agc(g, w, False, 0.02, 1e-3), reference_agc(gt, wt, False, 0.02, 1e-3)]
    unitwise_clip_([g, gt], [w, wt], [False, False], 0.02)
    torch.testing.assert_close(g, exp[0])
    torch.testing.assert_close(gt, exp[1])
    assert g.is_contiguous(memory_format=torch.channels_last)


def test_classifier_weight_is_selected_by_module_not_position():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)            # registered first: first in parameters()
            self.body = nn.Linear(4, 8)

        def get_classifier(self):
            return self.fc

    m = HeadFirst()
    split = split_parameters(m)
    assert split.not_clipped == ["fc.weight"]
    assert any(p is m.fc.bias for p in split.clip)           # the head's bias is clipped
    assert any(p is m.body.weight for p in split.clip)


def test_grouping_on_a_real_nfnet():
    model, _, _ = build_model("tiny", num_classes=5)
    split = split_parameters(model)
    names = dict(model.named_parameters())
    decay_ids = {id(p) for p in split.decay}
    for name, p in names.items():
        gain_like = name.endswith(("gain", "bias")) or p.ndim <= 1
        assert (id(p) in decay_ids) != gain_like, name        # no decay on gains/biases/skip gains
    assert split.not_clipped == ["head.fc.weight"]
    assert "stages.0.0.skipinit_gain" in split.clip_names
    gain_idx = split.clip_names.index("stem.conv1.gain")
    assert split.clip_whole[gain_idx]                         # (O,1,1,1) gain: one unit


def test_agc_on_real_tiny_nfnet_gradients():
    torch.manual_seed(0)
    model, _, _ = build_model("tiny", num_classes=5)
    x = torch.randn(8, 3, 48, 48)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 5, (8,))).mul(100).backward()
    split = split_parameters(model)
    before = {n: p.grad.clone() for n, p in zip(split.clip_names, split.clip)}
    expected = {n: reference_agc(p.grad, p, wh, 0.01, 1e-3)
                for n, p, wh in zip(split.clip_names, split.clip, split.clip_whole)}
    head_grad = model.get_classifier().weight.grad.clone()
    AGC.for_model(model, 0.01)()
    params = dict(model.named_parameters())
    for name, exp in expected.items():
        torch.testing.assert_close(params[name].grad, exp, rtol=1e-5, atol=1e-10)
    changed = [n for n in expected if not torch.equal(before[n], params[n].grad)]
    assert len(changed) >= 20    # the large loss clips many units (residual branches start at 0)
    assert torch.equal(model.get_classifier().weight.grad, head_grad)   # not clipped


def test_agc_plan_covers_every_clipped_tensor_once():
    model, _, _ = build_model("f0", 1000, device="meta")
    split = split_parameters(model)
    for solo in (1 << 12, 1 << 22):          # the CPU and the GPU planning
        agc = AGC(split.clip, split.clip_whole, 0.01, solo_numel=solo)
        covered = sorted(i for g in agc.groups for i in g.index)
        assert covered == list(range(len(agc.params)))
        for g in agc.groups:                  # big tensors alone, small ones share a unit length
            if len(g.index) > 1:
                assert all(agc.params[i].numel() < solo for i in g.index)
    assert len(agc.groups) < len(agc.params) / 3      # GPU planning: far fewer groups than tensors
