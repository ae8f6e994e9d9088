"""The plan of a training run: values derived from a recipe section, the data and the launch.

Written into the resolved recipe next to the outputs and printed by `--dry-run`, so nothing
derived (lr from the batch, steps from epochs and the sample count, accumulation from the batch
per device) is ever copied by hand between files.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pipeline.data.mixing import images_per_example
from pipeline.data.reader import StreamLayout
from pipeline.model_config import ModelConfig
from pipeline.recipe import TrainSection


@dataclass
class Plan:
    """Values derived from a recipe section, the data and the launch (written to the resolved
    recipe and printed by --dry-run)."""
    num_samples: int
    processes: int
    global_batch: int
    micro_batch: int
    accum_steps: int
    lr: float
    steps_per_epoch: float
    total_steps: int
    warmup_steps: float            # DeepMind: a float (5 epochs = 1563.92 steps for F0), not rounded
    epochs: float
    data_streams: int
    sub_batch: int                 # examples per stream per micro-batch
    loader_workers: int
    images_per_example: int = 1    # 2 with DeepMind's disjoint MixUp / CutMix pairs

    @property
    def images_per_step(self) -> int:
        """Samples read per optimiser step, all processes: the data cursor moves by this."""
        return self.global_batch * self.images_per_example

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(section: TrainSection, num_samples: int, processes: int,
              num_streams: int | None = None) -> Plan:
    # micro_batch is the most a device holds; when the global batch spread over the processes
    # is smaller (many GPUs), each device takes that share and accumulation drops to 1.
    micro = min(section.micro_batch, section.global_batch // processes)
    per_step = micro * processes
    if micro < 1 or section.global_batch % per_step:
        raise ValueError(
            f"global_batch {section.global_batch} cannot be split evenly into micro-batches of "
            f"at most {section.micro_batch} on {processes} processes; choose a micro_batch (or a "
            f"process count) that divides it")
    steps_per_epoch = num_samples / section.global_batch
    total = section.steps if section.steps is not None else int(section.epochs * steps_per_epoch)
    warmup = float(section.warmup_steps if section.warmup_steps is not None
                   else section.warmup_epochs * steps_per_epoch)
    if total < 1:
        raise ValueError(f"the run has no optimizer steps: {num_samples} samples, global_batch "
                         f"{section.global_batch}; lower global_batch or raise epochs/steps")
    if warmup >= total:
        raise ValueError(f"warm-up ({warmup:g} steps) must be shorter than the run ({total} steps)")
    layout = StreamLayout.for_run(micro, processes, section.loader.num_workers, num_streams)
    lr = section.lr_base * section.global_batch / 256 if section.lr_batch_scaling else section.lr_base
    aug = section.augment
    return Plan(num_samples, processes, section.global_batch, micro,
                section.global_batch // per_step, lr, steps_per_epoch, total, warmup,
                total / steps_per_epoch, layout.num_streams, layout.sub_batch, layout.loader_workers,
                images_per_example(aug.mix_pairs, aug.mixup_alpha, aug.cutmix_alpha))


def training_flops_per_image(model: nn.Module, res: int) -> float:
    """Forward + backward FLOPs for one image, counted by torch.utils.flop_counter on a copy of
    the model on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, 3, res, res, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta(x).sum().backward()
    return float(counter.get_total_flops())


def describe(plan: Plan, section: TrainSection, model: nn.Module, config: ModelConfig) -> dict:
    """The resolved plan that --dry-run prints: everything a user checks before a long run."""
    aug = section.augment
    flops = training_flops_per_image(model, section.train_res)
    passes = 2 if section.sam_rho else 1
    return {
        "variant": config.variant,
        "architecture": config.architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_classes": config.num_classes,
        "train_res": section.train_res, "test_res": section.test_res,
        "train_gflops_per_image": round(flops * passes / 1e9, 3),
        "samples": plan.num_samples, "processes": plan.processes,
        "global_batch": plan.global_batch, "micro_batch_per_device": plan.micro_batch,
        "accum_steps": plan.accum_steps, "lr": plan.lr,
        "warmup_steps": round(plan.warmup_steps, 4), "total_steps": plan.total_steps,
        "images_per_step": plan.images_per_step,
        "epochs": round(plan.epochs, 3), "steps_per_epoch": round(plan.steps_per_epoch, 3),
        "clip_factor": section.clip_factor, "weight_decay": section.weight_decay,
        "label_smoothing": section.label_smoothing,
        "augmentation": {"crop_scale": aug.crop_scale, "hflip": aug.hflip,
                         "randaugment": f"{aug.randaugment_layers} layers, magnitude "
                                        f"{aug.randaugment_magnitude}" if aug.randaugment_layers else "off",
                         "mixup_alpha": aug.mixup_alpha, "cutmix_alpha": aug.cutmix_alpha,
                         "mix_pairs": aug.mix_pairs, "randaugment_order": aug.randaugment_order},
        "ema_decay": section.ema_decay,
        "sam": (f"rho {section.sam_rho}: 2 forward-backward passes per step (2x compute)"
                if section.sam_rho else "off"),
        "drop_rate": section.model.drop_rate,
        "drop_path_rate": section.model.drop_path_rate,
        "total_train_pflops": round(flops * passes * plan.total_steps * plan.global_batch / 1e15, 3),
    }


def dry_run_report(plan: Plan, section: TrainSection, model: nn.Module, config: ModelConfig,
                   fmt: str) -> str:
    """--dry-run output: one JSON object, or aligned `key: value` lines."""
    desc = describe(plan, section, model, config)
    if fmt == "json":
        return json.dumps(desc)
    return "\n".join(f"{k:>24}: {v}" for k, v in desc.items())
