"""One optimiser step (pipeline/step.py): EMA warm-up, parameter groups, SAM composed with AGC,
weight decay and accumulation."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, stage_main
from pipeline.recipe import load_recipe
from pipeline.step import build_optimizer, ema_decay, mixed_cross_entropy
from pipeline.variants import build_model

RECIPE = str(ROOT / "recipes" / "demo.yaml")
TINY = ["pretrain.train_res=32", "pretrain.test_res=32", "pretrain.epochs=2", "pretrain.eval_every=0",
        "pretrain.loader.num_workers=0"]


def test_mixed_loss_weights_both_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    a, b = torch.tensor([0, 1]), torch.tensor([1, 0])
    full = mixed_cross_entropy(logits, a, b, torch.ones(2), 0.0)
    half = mixed_cross_entropy(logits, a, b, torch.full((2,), 0.5), 0.0)
    ce = torch.nn.functional.cross_entropy
    assert full.item() == pytest.approx(ce(logits, a).item())
    assert half.item() == pytest.approx(0.5 * (ce(logits, a) + ce(logits, b)).item())
    smoothed = mixed_cross_entropy(logits, a, a, torch.full((2,), 0.3), 0.1)
    assert smoothed.item() == pytest.approx(ce(logits, a, label_smoothing=0.1).item())


def test_ema_decay_warms_up_like_deepmind():
    assert ema_decay(0, 0.99999) == pytest.approx(0.1)
    assert ema_decay(90, 0.99999) == pytest.approx(91 / 100)
    assert ema_decay(10**7, 0.99999) == 0.99999


def test_optimizer_decays_conv_and_linear_weights_only():
    section = load_recipe(RECIPE).pretrain
    model, _, _ = build_model("tiny", 5)
    opt = build_optimizer(model, section, lr=0.1)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == section.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"stem.conv1.gain", "head.fc.bias",
                                                          "stages.0.0.skipinit_gain"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == section.momentum


def _weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.integration
def test_sam_composes_with_agc_weight_decay_and_accumulation(demo_shards, tmp_path):
    common = ["--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]), *TINY,
              "pretrain.epochs=null", "pretrain.steps=6", "pretrain.warmup_epochs=null",
              "pretrain.warmup_steps=1", "pretrain.micro_batch=32"]      # 2 micro-batches a step
    for name, rho in (("off", "null"), ("tiny", "1.0e-12"), ("on", "0.05")):
        assert stage_main("pretrain", [*common, f"pretrain.sam_rho={rho}", "--out", tmp_path / name]) == 0
    off, tiny, on = (_weights(tmp_path / n) for n in ("off", "tiny", "on"))
    # with a vanishing radius the second pass sees the same weights: SAM == plain SGD + AGC
    assert _max_diff(off, tiny) < 1e-6
    assert _max_diff(off, on) > 1e-4                                     # a real radius changes it
    assert all(torch.isfinite(t).all() for t in on.values())


def test_lr_follows_deepminds_warmup_cosine_with_a_fractional_warmup():
    """nfnets/optim.py WarmupCosineDecay: warm-up while t <= 1563.92 (no rounding), then cosine."""
    import math

    from pipeline.plan import make_plan
    from pipeline.step import build_scheduler
    section = load_recipe(ROOT / "recipes" / "f0.yaml").pretrain
    plan = make_plan(section, 1281167, 8)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.lr)
    sched = build_scheduler(opt, plan)
    w, n, peak = 5 * 1281167 / 4096, 112602, 1.6

    def deepmind(t):
        if t <= w:
            return peak * t / w
        return 0.5 * peak * (1 + math.cos(math.pi * (t - w) / (n - w)))

    for t in (0, 1, 781, 1563, 1564, 1565, 50000, 112601):
        sched.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(deepmind(t), rel=1e-9, abs=1e-12), t
