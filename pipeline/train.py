"""The training loop shared by pretrain and finetune: accelerate inline, no callbacks.

One optimiser step = `accum_steps` micro-batches per process; gradients are averaged across
processes by DDP, accumulated, clipped once with AGC (after the reduce), then SGD applies
coupled weight decay and Nesterov momentum, in DeepMind's order. The LR schedule, the EMA decay,
the data order and all randomness are functions of the step, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from timm.scheduler import CosineLRScheduler
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from pipeline import checkpoint as ckpt
from pipeline.agc import AGC, split_parameters
from pipeline.data.device_aug import DeviceAugment
from pipeline.data.manifest import load_split, read_manifest
from pipeline.data.reader import (Cursor, TrainStreams, advance, make_loader, micro_batches,
                                  rescale_cursor)
from pipeline.data.transforms import mix_batch, mixed_cross_entropy, normalize, train_transform
from pipeline.evaluate import validate
from pipeline.plan import Plan, make_plan
from pipeline.recipe import TrainSection, to_dict
from pipeline.variants import has_batchnorm


class NonFiniteLoss(RuntimeError):
    pass


def ema_decay(step: int, max_decay: float) -> float:
    """DeepMind's EMA warm-up: min(max_decay, (1 + t) / (10 + t))."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def build_optimizer(model: nn.Module, section: TrainSection, lr: float) -> torch.optim.Optimizer:
    """SGD(Nesterov) with weight decay on conv/linear weights only (not gains, biases, skip gains)."""
    split = split_parameters(model)
    groups = [{"params": split.decay, "weight_decay": section.weight_decay},
              {"params": split.no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=section.momentum,
                           nesterov=section.nesterov)


@dataclass
class Job:
    """Everything a training run needs besides the recipe section."""
    stage: str                      # "pretrain" or "finetune"
    section: TrainSection
    model: nn.Module
    shards: Path
    out: Path
    config: dict[str, Any]          # model config.json (architecture, classes, resolutions)
    resume: str = "auto"            # auto | none | <checkpoint folder>
    init_fingerprint: str = ""
    record_keys: Optional[Path] = None  # write each rank's sample keys here (audits, tests)
    shard_url: Optional[str] = None     # read tars from here ({name} template), manifest from shards


def _accelerator(section: TrainSection, out: Path, accum: int) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = section.precision
    mixed = "bf16" if (precision == "bf16" or (precision == "auto" and cuda)) else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed, gradient_accumulation_steps=accum,
                       log_with=list(section.trackers) or None, project_dir=str(out))


def run(job: Job) -> dict[str, Any]:
    """Train; write checkpoints, the final model folder and metrics.json under `job.out`."""
    section, out = job.section, job.out
    split = load_split(job.shards, "train", job.shard_url)
    world = PartialState(cpu=not torch.cuda.is_available()).num_processes
    plan = make_plan(section, split.num_samples, world)
    acc = _accelerator(section, out, plan.accum_steps)
    dev, main = acc.device, acc.is_main_process

    model = _prepare_batchnorm(job.model, section, plan, acc).to(dev)
    if section.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, section, plan.lr)
    agc = AGC.for_model(model, section.clip_factor, section.agc_eps) if section.clip_factor else None
    ema = ModelEmaV3(model, decay=section.ema_decay) if section.ema_decay else None
    scheduler = CosineLRScheduler(optimizer, t_initial=plan.total_steps - plan.warmup_steps,
                                  lr_min=0.0, warmup_t=plan.warmup_steps, warmup_lr_init=0.0,
                                  warmup_prefix=True, t_in_epochs=False)
    ddp_model, optimizer = acc.prepare(model, optimizer)   # not the loader: see reader.make_loader

    fp = ckpt.fingerprint(job.stage, _resumable(section), split.urls, split.shard_lengths,
                          job.init_fingerprint)
    ckpt_root = out / "checkpoints" / fp
    step, cursor = 0, Cursor(0, 0, plan.data_streams)
    resumed_from = _find_resume(job.resume, ckpt_root)
    if resumed_from is not None:
        state, meta = ckpt.load_checkpoint(resumed_from, model, ema.module if ema else None)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, cursor = int(state["step"]), Cursor.from_state(state["cursor"])
        cursor = rescale_cursor(cursor, split.num_samples, plan.data_streams)
        if main:
            print(f"[{job.stage}] resumed from {resumed_from} at step {step} "
                  f"(epoch {cursor.epoch}, {cursor.offset} samples into each of "
                  f"{cursor.num_streams} streams)")

    on_device = section.loader.decode == "device"
    dataset = TrainStreams(split, None if on_device else train_transform(section.train_res, section.augment),
                           seed=section.seed, block=section.loader.shuffle_block, cursor=cursor,
                           rank=acc.process_index, world=acc.num_processes,
                           workers=plan.loader_workers, sub_batch=plan.sub_batch)
    batches = micro_batches(make_loader(dataset, plan.loader_workers, pin_memory=dev.type == "cuda"),
                            max(1, plan.loader_workers))
    if acc.log_with:
        acc.init_trackers(job.stage, config=_flat(to_dict(section)),
                          init_kwargs={"dvclive": {"dir": str(out / "dvclive"), "dvcyaml": None,
                                                   "save_dvc_exp": False,
                                                   "resume": resumed_from is not None}})

    bar = tqdm(total=plan.total_steps, initial=step, disable=not main, desc=job.stage,
               dynamic_ncols=True, mininterval=1.0)
    start_step, cursor0 = step, cursor
    loss_sum = torch.zeros(2, device=dev)       # (sum of finite step losses, their count)
    bad_step = torch.full((), -1, dtype=torch.long, device=dev)
    keys_log = None
    if job.record_keys:
        job.record_keys.mkdir(parents=True, exist_ok=True)
        keys_log = open(job.record_keys / f"rank{acc.process_index}.jsonl", "a", buffering=1)
    val_split = (load_split(job.shards, "val", job.shard_url) if section.eval_every and
                 "val" in read_manifest(job.shards)["splits"] else None)
    t_log, steps_since, last_loss, rate, t_start = time.perf_counter(), 0, float("nan"), 0.0, time.perf_counter()
    loop = _Loop(acc, ddp_model, optimizer, agc, section, plan, batches, keys_log,
                 DeviceAugment(section.train_res, section.augment, dev) if on_device else None)
    freeze_bn = getattr(section.model, "bn_stats", "train") == "freeze"
    _train_mode(ddp_model, freeze_bn)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    while step < plan.total_steps:
        scheduler.step_update(step)
        step_loss = loop.step(step)
        finite = torch.isfinite(step_loss)
        if section.nan_policy == "stop":      # recorded on the device: no sync per step
            bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, step + 1),
                                   bad_step)
        loss_sum += torch.stack([torch.where(finite, step_loss, torch.zeros_like(step_loss)),
                                 finite.float()])
        if ema is not None:
            ema.apply_update_(model, ema_decay(step, section.ema_decay))
        step += 1
        steps_since += 1
        bar.update(1)
        at_end = step == plan.total_steps
        if step % section.log_every == 0 or at_end:
            _check_finite(acc, bad_step, section, job.stage, ckpt_root)
            total, count = acc.reduce(loss_sum, "sum").tolist()
            last_loss = total / count if count else float("nan")
            now = time.perf_counter()
            rate = steps_since * plan.global_batch / (now - t_log)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}",
                            epoch=f"{step / plan.steps_per_epoch:.2f}")
            if acc.log_with:
                acc.log({"train/loss": last_loss, "train/lr": lr, "train/img_per_s": rate,
                         "train/epoch": step / plan.steps_per_epoch}, step=step)
            loss_sum.zero_()
            t_log, steps_since = now, 0
        if (section.checkpoint_every and step % section.checkpoint_every == 0) or at_end:
            _check_finite(acc, bad_step, section, job.stage, ckpt_root)
            consumed = (step - start_step) * plan.accum_steps * plan.sub_batch
            cursor_now = advance(cursor0, split.num_samples, consumed)
            if main:
                state = {"step": step, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "cursor": cursor_now.state_dict()}
                meta = {"stage": job.stage, "fingerprint": fp, "plan": plan.as_dict(),
                        "epoch": step / plan.steps_per_epoch}
                ckpt.save_checkpoint(ckpt_root, step, model, ema.module if ema else None,
                                     state, meta, section.keep_checkpoints)
            acc.wait_for_everyone()
        if val_split is not None and step % section.eval_every == 0:
            name = "ema" if ema is not None else "raw"
            m = validate({name: ema.module if ema is not None else model}, val_split, job.config,
                         batch=plan.micro_batch, workers=section.loader.num_workers, device=dev,
                         rank=acc.process_index, world=acc.num_processes, autocast=acc.autocast)[name]
            _train_mode(ddp_model, freeze_bn)
            bar.write(f"[{job.stage}] step {step}: val top-1 {m['top1']:.2f}% ({name}), nll {m['nll']:.4f}")
            if acc.log_with:
                acc.log({"val/top1": m["top1"], "val/nll": m["nll"]}, step=step)
    bar.close()
    if keys_log:
        keys_log.close()
    elapsed = time.perf_counter() - t_start
    if main:
        config = dict(job.config)
        config["nfnet_pipeline"] = {**config.get("nfnet_pipeline", {}), "stage": job.stage,
                                    "step": step, "fingerprint": fp}
        ckpt.save_model_dir(out / "model", model, ema.module if ema else None, config)
    acc.wait_for_everyone()
    return {"steps": step, "train_loss": last_loss, "img_per_s": rate, "train_time_s": elapsed,
            "skipped_steps": loop.skipped, "peak_mem_mb": _peak_memory_mb(dev),
            "resumed_from_step": start_step, "plan": plan.as_dict(),
            "model": acc.unwrap_model(ddp_model), "ema": ema.module if ema else None,
            "accelerator": acc}


@dataclass
class _Loop:
    """One optimiser step: micro-batches, (SAM,) backward, AGC after the reduce, SGD."""
    acc: Accelerator
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    agc: Optional[AGC]
    section: TrainSection
    plan: Plan
    batches: Any
    keys_log: Any
    device_aug: Optional[DeviceAugment] = None   # loader.decode: device
    skipped: int = 0                      # steps dropped by nan_policy: skip

    def inputs(self, batch: dict, step: int, micro: int):
        """Normalised, mixed inputs of a micro-batch; the same for the same (step, micro)."""
        dev, s = self.acc.device, self.section
        if self.device_aug is not None:
            images = self.device_aug(batch["jpeg"], batch["offsets"], batch["seed"])
        else:
            images = batch["image"].to(dev, non_blocking=True)
        x = normalize(images, s.channels_last)
        y = batch["label"].to(dev, non_blocking=True)
        rng = np.random.default_rng([s.seed, step, micro, self.acc.process_index])
        return mix_batch(x, y, s.augment.mixup_alpha, s.augment.cutmix_alpha, rng)

    def log_keys(self, step: int, micro: int, batch: dict) -> None:
        if self.keys_log:
            self.keys_log.write(json.dumps({"step": step, "micro": micro, "keys": batch["key"]}) + "\n")

    def loss(self, inputs) -> torch.Tensor:
        x, ya, yb, ratio = inputs
        with self.acc.autocast():
            logits = self.ddp_model(x)
        return mixed_cross_entropy(logits.float(), ya, yb, ratio, self.section.label_smoothing)

    def reseed(self, step: int) -> None:
        # dropout / stochastic depth draw from the global RNG: reseed it from (seed, step, rank),
        # so a resumed run (and SAM's second pass) draws the same masks
        acc = self.acc
        torch.manual_seed(self.section.seed * 1_000_003 + step * acc.num_processes + acc.process_index)

    def step(self, step: int) -> torch.Tensor:
        acc, plan, s = self.acc, self.plan, self.section
        batches = [next(self.batches) for _ in range(plan.accum_steps)] if s.sam_rho else None
        step_loss = torch.zeros((), device=acc.device)
        perturbation = None
        if s.sam_rho:
            step_loss = self._sam_ascent(batches, step)
            perturbation = self._sam_perturb()
        self.reseed(step)
        for micro in range(plan.accum_steps):
            batch = batches[micro] if batches is not None else next(self.batches)
            if perturbation is None:
                self.log_keys(step, micro, batch)
            with acc.accumulate(self.ddp_model):
                loss = self.loss(self.inputs(batch, step, micro))
                acc.backward(loss)
                if not s.sam_rho:
                    step_loss += loss.detach() / plan.accum_steps
                if acc.sync_gradients:           # gradients are reduced and accumulated here
                    if perturbation is not None:
                        with torch.no_grad():
                            torch._foreach_sub_(*perturbation)       # back to w before AGC
                    if self.agc is not None:
                        self.agc()
                    if s.nan_policy == "skip" and not _step_is_finite(acc, step_loss, self.optimizer):
                        self.optimizer.zero_grad(set_to_none=True)   # drop the step (syncs)
                        self.skipped += 1
                        if acc.is_main_process:
                            print(f"step {step}: non-finite loss, step skipped")
                        continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _sam_ascent(self, batches: list[dict], step: int) -> torch.Tensor:
        """SAM's first pass: this process's gradient at w, not reduced across processes
        (DDP's no_sync); the second pass's gradient is reduced once, as usual."""
        acc, plan = self.acc, self.plan
        self.reseed(step)
        total = torch.zeros((), device=acc.device)
        with acc.no_sync(self.ddp_model):
            for micro, batch in enumerate(batches):
                self.log_keys(step, micro, batch)
                loss = self.loss(self.inputs(batch, step, micro))
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


def _prepare_batchnorm(model: nn.Module, section: TrainSection, plan: Plan,
                       acc: Accelerator) -> nn.Module:
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


def _train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """train(), except that BN layers keep using (and not updating) their running statistics when
    `bn_stats: freeze` is set, or when they sit in a frozen part of the model (init.freeze)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            frozen = m.weight is not None and not m.weight.requires_grad
            if freeze_bn or frozen:
                m.eval()


def _peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB -> MiB


def _resumable(section: TrainSection) -> dict[str, Any]:
    """The recipe keys that change the run's result: not logging, loaders, checkpointing, or how
    the global batch is split into micro-batches (so a run can resume on more or fewer GPUs)."""
    d = to_dict(section)
    for k in ("micro_batch", "log_every", "checkpoint_every", "keep_checkpoints", "loader",
              "trackers", "compile", "channels_last", "precision", "nan_policy"):
        d.pop(k, None)
    return d


def _find_resume(resume: str, root: Path) -> Optional[Path]:
    if resume == "none":
        return None
    if resume == "auto":
        found = ckpt.complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ckpt.CheckpointError(f"--resume {resume}: not a complete checkpoint folder "
                                   f"(expected meta.json inside); complete ones under {root}: "
                                   f"{[p.name for p in ckpt.complete_checkpoints(root)]}")
    return path


def _step_is_finite(acc: Accelerator, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """Loss and every gradient finite on every process (a finite loss can still come with an
    infinite gradient). One host sync: only `nan_policy: skip` pays it, every step."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    ok = torch.isfinite(loss) & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    return bool(acc.reduce(ok.float(), "min").item() > 0)


def _check_finite(acc: Accelerator, bad_step: torch.Tensor, section: TrainSection, stage: str,
                  root: Path) -> None:
    """Stop (rank-wide) if any step's loss was NaN or infinite since the run started."""
    worst = acc.reduce(bad_step.clone(), "max").item() if acc.num_processes > 1 else bad_step.item()
    if worst >= 0:
        last = ckpt.complete_checkpoints(root)
        where = (f"the last good checkpoint, {last[-1]}, is untouched (resume from it with a "
                 f"lower lr)" if last else "no checkpoint had been written yet")
        raise NonFiniteLoss(
            f"[{stage}] the loss became NaN or infinite at step {int(worst)}: training stopped; "
            f"{where}. Lower {stage}.lr_base or {stage}.clip_factor, or set "
            f"{stage}.nan_policy=skip to drop such steps.")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def finish(result: dict[str, Any], job: Job) -> dict[str, Any]:
    """After training: validate EMA and raw weights on the `val` split if the shards have one,
    write `<out>/metrics.json` (the stage's DVC metrics) and return the metrics."""
    from pipeline.recipe import atomic_write_text

    acc, section = result["accelerator"], job.section
    metrics = {k: result[k] for k in ("steps", "train_loss", "img_per_s", "train_time_s",
                                      "skipped_steps", "peak_mem_mb")}
    if "val" in read_manifest(job.shards)["splits"]:
        models = {"ema": result["ema"], "raw": result["model"]}
        models = {k: v for k, v in models.items() if v is not None}
        val = validate(models, load_split(job.shards, "val", job.shard_url), job.config,
                       batch=section.micro_batch,
                       workers=section.loader.num_workers, device=acc.device,
                       rank=acc.process_index, world=acc.num_processes, autocast=acc.autocast)
        for name, m in val.items():
            metrics[f"val_top1_{name}"] = m["top1"]
            metrics[f"val_nll_{name}"] = m["nll"]
    if acc.is_main_process:
        atomic_write_text(job.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))
    acc.end_training()          # closes the trackers (and, in accelerate >= 1.x, the process group)
    return metrics
