"""Batch norm in training, for the BN baselines (recipes/*_bn.yaml): SyncBatchNorm across GPUs,
a warning when a forward pass sees too few images for stable statistics, and frozen statistics
(`model.bn_stats: freeze`, or BN layers inside frozen modules). NFNets have no BN layers, and
pass through unchanged."""
from __future__ import annotations

from accelerate import Accelerator
from torch import nn

from pipeline.plan import Plan
from pipeline.recipe import TrainSection
from pipeline.variants import has_batchnorm


def prepare_batchnorm(model: nn.Module, section: TrainSection, plan: Plan, acc: Accelerator) -> nn.Module:
    """BN baselines only: SyncBatchNorm when asked (on GPUs), and a warning when the per-device
    batch is too small for stable statistics. NFNets have no BN and pass through unchanged."""
    if not has_batchnorm(model):
        return model
    sync = section.model.sync_bn and plan.processes > 1
    if sync and acc.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync and acc.is_main_process:
        print("warning: model.sync_bn needs CUDA devices (torch's SyncBatchNorm); each process "
              "keeps its own batch statistics here")
        sync = False
    per_stats = plan.micro_batch * (plan.processes if sync else 1)
    if per_stats < 16 and acc.is_main_process:
        print(f"warning: batch norm statistics come from {per_stats} images per forward pass; "
              f"below ~16 they are noisy and accuracy drops (Wu & He 2018). Raise micro_batch, "
              f"or set model.sync_bn=true on GPUs. (NFNets have no such limit.)")
    return model


def train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """train(), except that BN layers keep using (and not updating) their running statistics when
    `bn_stats: freeze` is set, or when they sit in a frozen part of the model (init.freeze)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            frozen = m.weight is not None and not m.weight.requires_grad
            if freeze_bn or frozen:
                m.eval()
