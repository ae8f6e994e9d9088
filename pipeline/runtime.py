"""The process a stage runs in: the accelerator, which process this is, how much memory it used.

One factory for the training engine and the evaluate stage, so that both pick the device, mixed
precision and process group the same way: bf16 autocast on CUDA devices (`precision: auto`), plain
fp32 on the CPU. Launchers (`accelerate launch`, `torchrun`, SLURM's `srun`) set the process
group up through the environment; accelerate's `PartialState` reads it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState


def process_state() -> PartialState:
    """This launch's process state (rank, world size, device); starts the process group when a
    launcher asked for several processes."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return process_state().is_main_process


def num_processes() -> int:
    return process_state().num_processes


def mixed_precision(precision: str = "auto") -> str:
    """accelerate's mixed_precision for a recipe's `precision`: auto = bf16 on CUDA, fp32 on CPU."""
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available()):
        return "bf16"
    return "no"


def make_accelerator(precision: str = "auto", *, accum_steps: int = 1,
                     trackers: Sequence[str] = (), project_dir: Path | None = None
                     ) -> Accelerator:
    """The accelerator of a training run or an evaluation (no loader is ever prepared with it:
    the data is split by process in pipeline.data.reader)."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(precision),
                       gradient_accumulation_steps=accum_steps, log_with=list(trackers) or None,
                       project_dir=str(project_dir) if project_dir is not None else None)


def compile_model(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with inductor (the recipe's `compile: true`). `NFNET_COMPILE_BACKEND`
    picks another backend: the CPU test suite uses `eager` (dynamo's graph capture without
    inductor's code generation, which takes ~5 minutes for a tiny NFNet on a 2-core CPU)."""
    return torch.compile(module, backend=os.environ.get("NFNET_COMPILE_BACKEND", "inductor"))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory of this process, or on the CPU its peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB -> MiB
