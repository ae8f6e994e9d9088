"""One optimiser step: micro-batches in, (SAM,) backward, AGC after the reduce, SGD.

`accum_steps` micro-batches per process; DDP averages gradients across processes, accumulation
sums them, AGC clips once on the result, then SGD applies coupled weight decay and Nesterov
momentum: DeepMind's order. A micro-batch arrives as a `Batch` of finished examples (made by the
loader: pipeline/data/examples.py); the step moves it to the device, normalises the images and
weighs each example's two labels by its ratio (`mixed_cross_entropy`). Dropout and stochastic
depth draw from (seed, step, rank), so a resumed run repeats the step exactly.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import torch
from accelerate import Accelerator
from timm.scheduler import CosineLRScheduler
from torch import nn

from pipeline.agc import AGC, split_parameters
from pipeline.data.batch import Batch
from pipeline.data.transforms import normalize
from pipeline.plan import Plan
from pipeline.recipe import TrainSection


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labels_b: torch.Tensor,
                        ratio: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The loss of mixed examples: ratio x CE(label a) + (1 - ratio) x CE(label b), averaged
    (DeepMind's; an unmixed example has ratio 1)."""
    ce = torch.nn.functional.cross_entropy
    la = ce(logits, labels, reduction="none", label_smoothing=label_smoothing)
    lb = ce(logits, labels_b, reduction="none", label_smoothing=label_smoothing)
    return (ratio * la + (1 - ratio) * lb).mean()


@dataclass
class StepRunner:
    """Runs optimiser steps. `forward` is the module called for the loss (the DDP-wrapped model,
    or its torch.compile'd wrapper); `ddp_model` is what gradient sync is controlled on."""
    acc: Accelerator
    ddp_model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    agc: AGC | None
    section: TrainSection
    plan: Plan
    batches: Iterator[Batch]
    sample_log: IO[str] | None = None    # --sample-log: the keys of every micro-batch
    skipped: int = 0                      # steps dropped by nan_policy: skip

    def log_samples(self, step: int, micro: int, batch: Batch) -> None:
        if self.sample_log is not None:
            self.sample_log.write(json.dumps({"step": step, "micro": micro, "keys": batch.keys})
                                  + "\n")

    def loss(self, batch: Batch) -> torch.Tensor:
        """The mean loss of a micro-batch: its tensors to the device, the images normalised."""
        b = batch.to(self.acc.device)
        x = normalize(b.images, self.section.channels_last)
        with self.acc.autocast():
            logits = self.forward(x)
        return mixed_cross_entropy(logits.float(), b.labels, b.labels_b, b.ratio,
                                   self.section.label_smoothing)

    def reseed(self, step: int) -> None:
        # dropout / stochastic depth draw from the global RNG: reseed it from (seed, step, rank),
        # so a resumed run (and SAM's second pass) draws the same masks
        acc = self.acc
        torch.manual_seed(self.section.seed * 1_000_003 + step * acc.num_processes
                          + acc.process_index)

    def step(self, step: int) -> torch.Tensor:
        """One optimiser step; returns its mean loss on this process (a device tensor, no sync)."""
        acc, plan, s = self.acc, self.plan, self.section
        batches = [next(self.batches) for _ in range(plan.accum_steps)] if s.sam_rho else None
        step_loss = torch.zeros((), device=acc.device)
        perturbation = None
        if batches is not None:
            step_loss = self._sam_ascent(batches, step)
            perturbation = self._sam_perturb()
        self.reseed(step)
        for micro in range(plan.accum_steps):
            batch = batches[micro] if batches is not None else next(self.batches)
            if perturbation is None:
                self.log_samples(step, micro, batch)
            with acc.accumulate(self.ddp_model):
                loss = self.loss(batch)
                acc.backward(loss)
                if not s.sam_rho:
                    step_loss += loss.detach() / plan.accum_steps
                if acc.sync_gradients:           # gradients are reduced and accumulated here
                    if perturbation is not None:
                        with torch.no_grad():
                            torch._foreach_sub_(*perturbation)       # back to w before AGC
                    if self.agc is not None:
                        self.agc()
                    if s.nan_policy == "skip" and not step_is_finite(acc, step_loss, self.optimizer):
                        self.optimizer.zero_grad(set_to_none=True)   # drop the step (syncs)
                        self.skipped += 1
                        if acc.is_main_process:
                            print(f"step {step}: non-finite loss, step skipped")
                        continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _sam_ascent(self, batches: list[Batch], step: int) -> torch.Tensor:
        """SAM's first pass: this process's gradient at w, not reduced across processes
        (DDP's no_sync); the second pass's gradient is reduced once, as usual."""
        acc, plan = self.acc, self.plan
        self.reseed(step)
        total = torch.zeros((), device=acc.device)
        with acc.no_sync(self.ddp_model):
            for micro, batch in enumerate(batches):
                self.log_samples(step, micro, batch)
                loss = self.loss(batch)
                acc.backward(loss)
                total += loss.detach() / plan.accum_steps
        return total

    @torch.no_grad()
    def _sam_perturb(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """w <- w + rho * g / ||g||; returns (params, perturbation) to undo it."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        e = torch._foreach_mul(grads, self.section.sam_rho / (norm + 1e-12))
        torch._foreach_add_(params, e)
        self.optimizer.zero_grad(set_to_none=True)
        return params, e


def step_is_finite(acc: Accelerator, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """Loss and every gradient finite on every process (a finite loss can still come with an
    infinite gradient). One host sync: only `nan_policy: skip` pays it, every step."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    ok = torch.isfinite(loss) & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    return bool(acc.reduce(ok.float(), "min").item() > 0)


def ema_decay(step: int, max_decay: float) -> float:
    """DeepMind's EMA warm-up: min(max_decay, (1 + t) / (10 + t))."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def build_optimizer(model: nn.Module, section: TrainSection, lr: float) -> torch.optim.Optimizer:
    """SGD(Nesterov) with weight decay on conv/linear weights only (not gains, biases, skip gains)."""
    split = split_parameters(model)
    groups: list[dict[str, Any]] = [
        {"params": split.decay, "weight_decay": section.weight_decay},
        {"params": split.no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=section.momentum, nesterov=section.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, plan: Plan) -> CosineLRScheduler:
    """DeepMind's WarmupCosineDecay (nfnets/optim.py), stepped per optimiser step: linear from 0
    over `plan.warmup_steps` (a float: 5 epochs of F0 are 1563.92 steps), then cosine to 0."""
    return CosineLRScheduler(optimizer, t_initial=plan.total_steps - plan.warmup_steps, lr_min=0.0,
                             warmup_t=plan.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True,
                             t_in_epochs=False)
