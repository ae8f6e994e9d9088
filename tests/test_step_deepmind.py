"""The optimiser step (pipeline/step.py's StepRunner with the project's AGC and SGD) against
DeepMind's SGD_AGC update (nfnets/optim.py), written out here in float64: AGC on the step's whole
gradient (after accumulation), then coupled weight decay on conv / linear weights, then Nesterov
momentum, the classifier's weight not clipped (experiment_nfnets.py)."""
from __future__ import annotations

import copy

import torch

from conftest import ROOT, reset_accelerator_state
from pipeline import runtime
from pipeline.agc import AGC
from pipeline.data.batch import Batch
from pipeline.data.transforms import normalize
from pipeline.plan import make_plan
from pipeline.recipe import load_recipe
from pipeline.step import StepRunner, build_optimizer, mixed_cross_entropy
from pipeline.variants import build_model

# lr 0.4 and clip factor 0.002: large steps, and most units clipped (a wrong order shows)
OVERRIDES = ["pretrain.train_res=32", "pretrain.global_batch=16", "pretrain.micro_batch=8",
             "pretrain.lr_base=0.4", "pretrain.lr_batch_scaling=false", "pretrain.clip_factor=0.002",
             "pretrain.weight_decay=0.01", "pretrain.label_smoothing=0.1",
             "pretrain.channels_last=false", "pretrain.precision=fp32"]


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """DeepMind's unitwise_norm in torch's layouts: the whole tensor for what squeezes to at most
    one dimension (gains, biases, skip gains), else one norm per output unit (dim 0)."""
    if x.squeeze().dim() <= 1:
        return x.pow(2).sum().sqrt()
    return x.pow(2).sum(dim=tuple(range(1, x.dim())), keepdim=True).sqrt()


def deepmind_update(params, grads, momenta, *, lr, momentum, weight_decay, clip, eps, head,
                    clip_after_decay=False):
    """One SGD_AGC update of float64 tensors (in place). `clip_after_decay` is a wrong order, for
    the control."""
    clipped = 0
    for name, p in params.items():
        g = grads[name]
        # conv / linear weights only: not gains (timm's are (O, 1, 1, 1), DeepMind's vectors),
        # biases or skip gains
        wd = weight_decay if p.dim() > 1 and not name.endswith("gain") else 0.0
        if clip_after_decay:
            g = g + wd * p
        if name != head:
            max_norm = unitwise_norm(p).clamp_min(eps) * clip
            g_norm = unitwise_norm(g)
            trigger = g_norm > max_norm
            clipped += int(trigger.sum())
            g = torch.where(trigger, g * (max_norm / g_norm.clamp_min(1e-6)), g)
        if not clip_after_decay:
            g = g + wd * p
        momenta[name] = momentum * momenta[name] + g
        p -= lr * (g + momentum * momenta[name])              # Nesterov
    return clipped


def test_two_accumulated_steps_match_deepminds_sgd_agc_update_in_float64():
    section = load_recipe(ROOT / "recipes" / "demo.yaml", OVERRIDES).pretrain
    plan = make_plan(section, 64, 1)
    assert plan.accum_steps == 2
    gen = torch.Generator().manual_seed(0)
    micro = [Batch.unmixed(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=gen),
                           torch.randint(0, 5, (8,), generator=gen), [f"s{i}" for i in range(8)],
                           torch.arange(8)) for _ in range(4)]
    model, _, _ = build_model("tiny", 5, seed=0)
    start = copy.deepcopy(model)
    reset_accelerator_state()                  # a fresh accelerator for this run
    try:
        acc = runtime.make_accelerator("fp32", accum_steps=plan.accum_steps)
        prepared, optimizer = acc.prepare(model, build_optimizer(model, section, plan.lr))
        runner = StepRunner(acc, prepared, prepared, optimizer,
                            AGC.for_model(model, section.clip_factor, section.agc_eps), section,
                            plan, iter(micro))
        runner.step(0)
        runner.step(1)
    finally:
        reset_accelerator_state()
    ours = {n: p.detach().double() for n, p in model.named_parameters()}

    def reference(**kw):
        ref = copy.deepcopy(start).double()
        params = dict(ref.named_parameters())
        momenta = {n: torch.zeros_like(p) for n, p in params.items()}
        clipped = 0
        for step in range(2):                  # the step's gradient: the mean over its examples
            batch = Batch.concat(micro[2 * step: 2 * step + 2])
            loss = mixed_cross_entropy(ref(normalize(batch.images).double()), batch.labels,
                                       batch.labels_b, batch.ratio.double(),
                                       section.label_smoothing)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            with torch.no_grad():
                clipped += deepmind_update(params, grads, momenta, lr=plan.lr,
                                           momentum=section.momentum,
                                           weight_decay=section.weight_decay,
                                           clip=section.clip_factor, eps=section.agc_eps,
                                           head="head.fc.weight", **kw)
        return {n: p.detach() for n, p in params.items()}, clipped

    theirs, clipped = reference()
    assert clipped > 50                        # the clip factor bites: AGC is really exercised
    before = {n: p.detach().double() for n, p in start.named_parameters()}
    moved = max((ours[n] - before[n]).abs().max().item() for n in ours)
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert moved > 1e-2 and worst < 1e-5, (moved, worst)
    # the control: weight decay before the clip (a plausible slip) is far outside that tolerance
    wrong, _ = reference(clip_after_decay=True)
    assert max((ours[n] - wrong[n]).abs().max().item() for n in ours) > 100 * max(worst, 1e-7)
    print(f"max |ours - DeepMind's update| after 2 steps: {worst:.1e} (weights moved {moved:.2f})")
