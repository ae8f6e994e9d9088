"""The training engine shared by pretrain and finetune: accelerate inline, no callbacks.

The stage computes (pipeline/train_cli.py: the split, the plan, the model and its config.json,
the run's identity, what to resume); the engine consumes that `Job` as it is:

    run(job)
      Trainer(job)                every piece of the run's state, made here: accelerator, model on
                                  its device, optimizer, AGC, EMA, LR schedule, data cursor
      Trainer.resume()            the checkpoint the stage chose (pipeline/resume.py), if any
      Trainer.train()             the step loop, top to bottom: stop agreement, one optimiser step
                                  (pipeline/step.py), EMA, logs, checkpoints, validation points
      Trainer.finish()            the model folder, final validation, metrics.json -> TrainResult

The LR schedule, the EMA decay, the data order and all randomness are functions of the step, so
a resumed run continues exactly (bit-identical weights on CPU).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from pipeline import checkpoint as ckpt
from pipeline import resume as resuming
from pipeline import runtime
from pipeline.agc import AGC
from pipeline.batchnorm import prepare_batchnorm, train_mode
from pipeline.data.batch import BadSample
from pipeline.data.examples import ExampleRecipe
from pipeline.data.loader import BadSampleLog, Waited, checked, make_loader, micro_batches
from pipeline.data.manifest import SplitInfo
from pipeline.data.prefetch import DevicePrefetcher
from pipeline.data.reader import Cursor, TrainStreams, advance, rescale_cursor
from pipeline.data.shard_reader import DataError
from pipeline.evaluate import validate
from pipeline.files import atomic_dir, atomic_write_text
from pipeline.model_config import ModelConfig
from pipeline.model_dir import save_model_dir
from pipeline.plan import Plan
from pipeline.preemption import Preempted, RunControl
from pipeline.recipe import LoaderSection, TrainSection, to_dict
from pipeline.resume import PREEMPTED, Identity
from pipeline.step import StepRunner, build_optimizer, build_scheduler, ema_decay

__all__ = ["DataError", "Job", "NonFiniteLoss", "Preempted", "TrainResult", "Trainer",
           "build_optimizer", "ema_decay", "run"]
DATA_WAIT_HINT = 0.25             # a log interval waiting longer for data than this gets a hint


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite (nan_policy: stop); the message names the step and the
    last good checkpoint."""


@dataclass
class Job:
    """What the stage computed for a training run; the engine uses it as it is."""
    stage: str                      # "pretrain" or "finetune"
    section: TrainSection
    model: nn.Module
    config: ModelConfig             # config.json exactly as the model folder will hold it
    split: SplitInfo                # the training split
    val_split: SplitInfo | None     # validation points and the final validation, if any
    plan: Plan
    identity: Identity              # what makes it the same run (its checkpoints' folder)
    out: Path
    resume: str = "auto"            # auto | matching | none | <checkpoint folder> (resume.py)
    sample_log: Path | None = None  # --sample-log: each rank's sample keys, DIR/rank<N>.jsonl


@dataclass
class TrainResult:
    """What a finished run reports (also written to `<out>/metrics.json` by `metrics()`)."""
    steps: int
    train_loss: float
    img_per_s: float
    train_time_s: float
    skipped_steps: int
    peak_mem_mb: float
    resumed_from_step: int
    plan: Plan
    val: dict[str, dict[str, float]] = field(default_factory=dict)   # weights -> top1, nll
    compile_s: float | None = None   # wall time of the first step, which compiles (compile on)
    bad_samples: int = 0                # unreadable samples replaced (loader.bad_samples: skip)
    data_wait_share: float = float("nan")   # the step's time spent waiting for data (after the
                                            # first step, which starts the loader)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "steps", "train_loss", "img_per_s", "train_time_s", "skipped_steps", "peak_mem_mb",
            "bad_samples", "data_wait_share")}
        if self.compile_s is not None:
            out["compile_s"] = self.compile_s
        for name, m in self.val.items():
            out[f"val_top1_{name}"] = m["top1"]
            out[f"val_nll_{name}"] = m["nll"]
        return out


def run(job: Job) -> TrainResult:
    """Train; write checkpoints, the final model folder and metrics.json under `job.out`. A stop
    signal from here on (pipeline/preemption.py) ends the run at a step boundary with a
    checkpoint (Preempted); unreadable data ends it with DataError."""
    with RunControl() as control:
        trainer = Trainer(job, control)
        trainer.resume()
        trainer.train()
    return trainer.finish()


@dataclass
class Meter:
    """What the log points and the result measure, on the device where it is summed per step
    (no host sync in a step)."""
    loss_sum: torch.Tensor          # (sum of the finite step losses since the last log, count)
    bad_step: torch.Tensor          # the first non-finite step + 1, else -1
    t_start: float = 0.0
    t_log: float = 0.0
    steps_since: int = 0            # steps since the last log point
    waited_at_log: float = 0.0      # the loader's wait counter at the last log point
    first_step: tuple[float, float] = (0.0, 0.0)   # (seconds, of which waiting for data)
    last_loss: float = float("nan")
    rate: float = 0.0               # examples/s over the last log interval
    train_time_s: float = 0.0
    hinted: bool = False            # the data-wait hint was said


class Trainer:
    """One training run (see the module docstring). Its state is all made in __init__."""

    def __init__(self, job: Job, control: RunControl):
        s, plan = job.section, job.plan
        self.job, self.section, self.plan, self.out, self.control = job, s, plan, job.out, control
        self.acc = runtime.make_accelerator(s.precision, accum_steps=plan.accum_steps,
                                            trackers=s.trackers, project_dir=job.out)
        self.device = self.acc.device
        model = prepare_batchnorm(job.model, s, plan, self.acc).to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if s.channels_last else model
        self.optimizer = build_optimizer(self.model, s, plan.lr)
        self.agc = AGC.for_model(self.model, s.clip_factor, s.agc_eps) if s.clip_factor else None
        self.ema = ModelEmaV3(self.model, decay=s.ema_decay) if s.ema_decay else None
        self.scheduler = build_scheduler(self.optimizer, plan)
        # the model and optimizer only: the loader is never prepared (pipeline/data/loader.py)
        self.ddp_model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.forward = runtime.compile_model(self.ddp_model) if s.compile else self.ddp_model
        self.ckpt_root = job.out / "checkpoints" / job.identity.fingerprint
        self.cursor = Cursor(0, 0, plan.data_streams)
        self.step = self.start_step = 0
        self.saved_step = -1                    # the step of the newest checkpoint written
        self.resumed_from: Path | None = None
        self.compile_s: float | None = None
        self.skipped = 0                        # steps dropped by nan_policy: skip
        self.waited = Waited(iter(()))          # the loader's batches, with their wait (train())
        where = f"rank {self.acc.process_index}: " if self.acc.num_processes > 1 else ""
        self.bad = BadSampleLog(lambda line: tqdm.write(line, file=sys.stdout),
                                f"[{job.stage}] {where}")   # this process's replaced samples
        self.meter = Meter(torch.zeros(2, device=self.device),
                           torch.full((), -1, dtype=torch.long, device=self.device))

    def resume(self) -> Path | None:
        """Load the checkpoint `job.resume` names (auto: the newest complete one of this run):
        weights, EMA, optimizer, scheduler, step and data cursor; the dvclive logs as they were at
        that step; the last logged loss and rate (for a run resumed at its last step, whose finish
        has no step of its own to report)."""
        found = resuming.find_resume(self.job.resume, self.ckpt_root)
        if found is None:
            return None
        state, meta = ckpt.load_checkpoint(found, self.model, self.ema.module if self.ema else None)
        self.meter.last_loss = meta.get("train_loss", self.meter.last_loss)
        self.meter.rate = meta.get("img_per_s", self.meter.rate)
        if self.acc.is_main_process and (found / "dvclive").is_dir():
            # dvclive appends on resume: its files must end at this step (DVC may also have
            # removed them before a `dvc repro` that resumes)
            with atomic_dir(self.out / "dvclive", what="the dvclive logs") as tmp:
                shutil.copytree(found / "dvclive", tmp, dirs_exist_ok=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.cursor = rescale_cursor(Cursor.from_state(state["cursor"]), self.job.split.num_samples,
                                     self.plan.data_streams)
        self.step = self.start_step = int(state["step"])
        self.resumed_from = found
        if self.acc.is_main_process:
            print(f"[{self.job.stage}] resumed from {found} at step {self.step} (epoch "
                  f"{self.cursor.epoch}, {self.cursor.offset} samples into each of "
                  f"{self.cursor.num_streams} streams)")
        return found

    def train(self) -> None:
        """The step loop, from the resumed step to the plan's last. At every step boundary the
        processes agree on stopping (a signal: Preempted) and on unreadable data (DataError)."""
        s, plan, m = self.section, self.plan, self.meter
        bar = tqdm(total=plan.total_steps, initial=self.step, disable=not self.acc.is_main_process,
                   desc=self.job.stage, dynamic_ncols=True, mininterval=1.0)
        with self.open_data() as runner:
            train_mode(self.ddp_model, s.freeze_bn_stats)
            runtime.reset_peak_memory(self.device)
            m.t_start = m.t_log = time.perf_counter()
            m.waited_at_log = self.waited.seconds
            try:
                while self.step < plan.total_steps:
                    stop, bad = self.control.exchange()      # one small all-reduce, a step late
                    self.stop_if_bad_data(bad)
                    if stop:
                        bar.close()
                        self.preempt(self.control.signame)
                    t0 = time.perf_counter()
                    self.scheduler.step_update(self.step)
                    step_loss = runner.step(self.step)       # micro-batches, backward, AGC, SGD
                    if self.step == self.start_step:         # it starts the loader (and compiles)
                        m.first_step = (time.perf_counter() - t0, self.waited.seconds)
                        self.compile_s = m.first_step[0] if s.compile else None
                    self._account(step_loss)
                    if self.ema is not None:
                        self.ema.apply_update_(self.model, ema_decay(self.step, s.ema_decay))
                    self.step += 1
                    m.steps_since += 1
                    bar.update(1)
                    self.control.bad_samples = len(self.bad)
                    at_end = self.step == plan.total_steps
                    if self.step % s.log_every == 0 or at_end:
                        self.log(bar)
                    if (s.checkpoint_every and self.step % s.checkpoint_every == 0) or at_end:
                        self.save_checkpoint()
                    if self.job.val_split is not None and s.eval_every and self.step % s.eval_every == 0:
                        self.validate_point(bar)
            finally:
                bar.close()                  # whatever ends the loop, the next line starts clean
                self.skipped = runner.skipped
                for line in self.bad.summary():     # the replaced samples, per shard
                    tqdm.write(line, file=sys.stdout)
        m.train_time_s = time.perf_counter() - m.t_start

    @contextlib.contextmanager
    def open_data(self) -> Iterator[StepRunner]:
        """The training streams from the cursor on, as the step's runner reads them; the sample
        log and the trackers. On exit (whatever ended the loop) the loader, its workers and the
        prefetch thread stop."""
        job, s, plan, acc = self.job, self.section, self.plan, self.acc
        on_device = s.loader.decode == "device"
        recipe = ExampleRecipe.of(s.train_res, s.augment)
        dataset = TrainStreams(job.split, recipe, seed=s.seed, block=s.loader.shuffle_block,
                               cursor=self.cursor, rank=acc.process_index, world=acc.num_processes,
                               workers=plan.loader_workers, sub_batch=plan.sub_batch,
                               on_device=on_device, strict=s.loader.bad_samples == "stop")
        loader = make_loader(dataset, plan.loader_workers, pin_memory=self.device.type == "cuda")
        batches = micro_batches(loader, max(1, plan.loader_workers))
        # decode: device: the next micro-batches' examples are made ahead on the device, off the
        # step's critical path (a side CUDA stream in a thread; pipeline/data/prefetch.py)
        prefetcher = DevicePrefetcher(batches, recipe, self.device) if on_device else None
        self.waited = Waited(checked(prefetcher or batches, self.report_bad, lambda note:
                                     tqdm.write(f"[{job.stage}] warning: {note}", file=sys.stdout)))
        if acc.log_with:
            acc.init_trackers(job.stage, config=_flat(to_dict(s)), init_kwargs={"dvclive": {
                "dir": str(self.out / "dvclive"), "dvcyaml": None, "save_dvc_exp": False,
                "resume": self.resumed_from is not None}})
        try:
            with self.sample_log() as sample_log:
                yield StepRunner(acc, self.ddp_model, self.forward, self.optimizer, self.agc, s,
                                 plan, self.waited, sample_log)
        finally:
            self.waited.close()                  # frees the DataLoader iterator: workers stop
            if prefetcher is not None:
                prefetcher.close()               # its thread, then the source generator

    @contextlib.contextmanager
    def sample_log(self) -> Iterator[IO[str] | None]:
        """This rank's sample log (`--sample-log`), open for the step loop, or None."""
        if self.job.sample_log is None:
            yield None
            return
        self.job.sample_log.mkdir(parents=True, exist_ok=True)
        with open(self.job.sample_log / f"rank{self.acc.process_index}.jsonl", "a", buffering=1) as f:
            yield f

    def report_bad(self, record: BadSample) -> None:
        """A sample the loader could not read and replaced: counted, said once per shard."""
        s = self.section.loader
        policy = (f"loader.bad_samples={s.bad_samples}: " +
                  ("the run stops at the next step boundary" if s.bad_samples == "stop" else
                   f"the run stops beyond {s.max_bad_samples} on a process"))
        self.bad.add(record, policy)

    def stop_if_bad_data(self, total: int) -> None:
        """Stop (every process at once) when unreadable samples exceed the recipe's policy."""
        s, stage = self.section.loader, self.job.stage
        budget = 0 if s.bad_samples == "stop" else s.max_bad_samples
        if total <= budget:
            return
        first = self.bad.records[0] if self.bad.records else None
        what = (f"the first here: {first.key} in {first.url}: {first.reason}" if first
                else "see the other processes' lines above")
        fix = (f"re-shard the damaged shards, or set {stage}.loader.bad_samples=skip to train "
               f"around them" if s.bad_samples == "stop" else
               f"re-shard the damaged shards, or raise {stage}.loader.max_bad_samples")
        url = first.url if first else ""
        raise DataError(f"[{stage}] {total} training sample(s) could not be read "
                        f"(loader.bad_samples={s.bad_samples}, allowed {budget}); {what}. "
                        f"Check the shards: python stages/shard.py --verify --out "
                        f"{Path(url).parent if url else '<shards>'}; then {fix}")

    def preempt(self, signame: str) -> None:
        """Stop at this step boundary: one complete checkpoint, `<out>/PREEMPTED.json`, the
        trackers flushed; raises Preempted (the stage exits with EXIT_PREEMPTED)."""
        if self.saved_step != self.step:
            self.save_checkpoint()
        last = ckpt.complete_checkpoints(self.ckpt_root)
        where = str(last[-1]) if last else "(none)"
        if self.acc.is_main_process:
            atomic_write_text(self.out / PREEMPTED, json.dumps(
                {"step": self.step, "signal": signame, "checkpoint": where,
                 "fingerprint": self.job.identity.fingerprint,
                 "resume": "run the same command again (--resume auto)"}, indent=1) + "\n")
        self.acc.wait_for_everyone()
        self.acc.end_training()
        raise Preempted(self.step, signame, where)

    def _account(self, step_loss: torch.Tensor) -> None:
        """Add a step's loss to the running sum and remember the first non-finite step, on the
        device: no host sync per step."""
        m, finite = self.meter, torch.isfinite(step_loss)
        if self.section.nan_policy == "stop":
            m.bad_step = torch.where((m.bad_step < 0) & ~finite,
                                     torch.full_like(m.bad_step, self.step + 1), m.bad_step)
        m.loss_sum += torch.stack([torch.where(finite, step_loss, torch.zeros_like(step_loss)),
                                   finite.float()])

    def log(self, bar: tqdm) -> None:
        """A log point: the mean loss since the last one (all processes), lr, examples/s, the
        share of the time the step waited for data (and, once, what to do when it is high)."""
        m = self.meter
        self.stop_if_non_finite()
        total, count = self.acc.reduce(m.loss_sum, "sum").tolist()
        m.last_loss = total / count if count else float("nan")
        now = time.perf_counter()
        m.rate = m.steps_since * self.plan.global_batch / (now - m.t_log)
        lr = self.optimizer.param_groups[0]["lr"]
        epoch = self.step / self.plan.steps_per_epoch
        share = (self.waited.seconds - m.waited_at_log) / max(now - m.t_log, 1e-9)
        bar.set_postfix(loss=f"{m.last_loss:.4f}", lr=f"{lr:.4g}", img_s=f"{m.rate:.0f}",
                        data=f"{share:.0%}", epoch=f"{epoch:.2f}")
        if self.acc.log_with:
            self.acc.log({"train/loss": m.last_loss, "train/lr": lr, "train/img_per_s": m.rate,
                          "train/data_wait_share": share, "train/epoch": epoch}, step=self.step)
        first_interval = self.step - self.start_step <= m.steps_since   # it starts the loader
        hint = None if m.hinted or first_interval else data_wait_hint(
            share, self.job.stage, self.section.loader, (self.step - m.steps_since + 1, self.step))
        if hint:
            m.hinted = True
            bar.write(hint)
        m.loss_sum.zero_()
        m.t_log, m.steps_since, m.waited_at_log = now, 0, self.waited.seconds

    def stop_if_non_finite(self) -> None:
        """Stop (rank-wide) if any step's loss was NaN or infinite since the run started."""
        acc = self.acc
        worst = (acc.reduce(self.meter.bad_step.clone(), "max").item() if acc.num_processes > 1
                 else self.meter.bad_step.item())
        if worst < 0:
            return
        stage = self.job.stage
        last = ckpt.complete_checkpoints(self.ckpt_root)
        where = (f"the last good checkpoint, {last[-1]}, is untouched (resume from it with a "
                 f"lower lr)" if last else "no checkpoint had been written yet")
        raise NonFiniteLoss(
            f"[{stage}] the loss became NaN or infinite at step {int(worst)}: training stopped; "
            f"{where}. Lower {stage}.lr_base or {stage}.clip_factor, or set "
            f"{stage}.nan_policy=skip to drop such steps.")

    def save_checkpoint(self) -> None:
        """Write `checkpoints/<fingerprint>/step-N` atomically (main process; all wait)."""
        self.stop_if_non_finite()
        plan, identity = self.plan, self.job.identity
        consumed = ((self.step - self.start_step) * plan.accum_steps * plan.sub_batch
                    * plan.images_per_example)              # samples per stream
        cursor = advance(self.cursor, self.job.split.num_samples, consumed)
        if self.acc.is_main_process:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "cursor": cursor.state_dict()}
            meta = {"stage": self.job.stage, "fingerprint": identity.fingerprint,
                    "plan": plan.as_dict(), "epoch": self.step / plan.steps_per_epoch,
                    "train_loss": self.meter.last_loss, "img_per_s": self.meter.rate,
                    **identity.meta()}
            ckpt.save_checkpoint(self.ckpt_root, self.step, self.model,
                                 self.ema.module if self.ema else None, state, meta,
                                 self.section.keep_checkpoints, logs=self.out / "dvclive")
        self.acc.wait_for_everyone()
        self.saved_step = self.step

    def validate_point(self, bar: tqdm) -> None:
        """A point of the validation curve (`eval_every`): top-1 of the EMA (else raw) weights."""
        name = "ema" if self.ema is not None else "raw"
        m = self._validate({name: self.ema.module if self.ema is not None else self.model})[name]
        train_mode(self.ddp_model, self.section.freeze_bn_stats)
        bar.write(f"[{self.job.stage}] step {self.step}: val top-1 {m['top1']:.2f}% ({name}), "
                  f"nll {m['nll']:.4f}")
        if self.acc.log_with:
            self.acc.log({"val/top1": m["top1"], "val/nll": m["nll"]}, step=self.step)

    def _validate(self, models: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
        assert self.job.val_split is not None
        acc = self.acc
        return validate(models, self.job.val_split, self.job.config, batch=self.plan.micro_batch,
                        workers=self.section.loader.num_workers, device=self.device,
                        rank=acc.process_index, world=acc.num_processes, autocast=acc.autocast,
                        compile=self.section.compile)

    def finish(self) -> TrainResult:
        """The model folder (the stage's config.json as it is), the final validation (EMA and
        raw) and `<out>/metrics.json`."""
        job, acc, m = self.job, self.acc, self.meter
        ema = self.ema.module if self.ema is not None else None
        if acc.is_main_process:
            save_model_dir(self.out / "model", self.model, ema, job.config)
        acc.wait_for_everyone()
        bad = int(acc.reduce(torch.tensor(len(self.bad), device=self.device), "sum").item()
                  if acc.num_processes > 1 else len(self.bad))
        first_s, first_wait = m.first_step
        rest = m.train_time_s - first_s
        share = (self.waited.seconds - first_wait) / rest if rest > 0 else float("nan")
        result = TrainResult(self.step, m.last_loss, m.rate, m.train_time_s, self.skipped,
                             runtime.peak_memory_mb(self.device), self.start_step, self.plan,
                             compile_s=self.compile_s, bad_samples=bad,
                             data_wait_share=round(share, 4))
        if job.val_split is not None:
            models = {k: v for k, v in (("ema", ema), ("raw", self.model)) if v is not None}
            result.val = {k: {"top1": r["top1"], "nll": r["nll"]}
                          for k, r in self._validate(models).items()}
        if acc.is_main_process:
            metrics = result.metrics()
            atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            resuming.clear_marker(self.out, self.ckpt_root)    # finished: nothing to requeue
            print(json.dumps(metrics, indent=2))
        acc.end_training()      # closes the trackers (and, in accelerate >= 1.x, the process group)
        final = ckpt.complete_checkpoints(self.ckpt_root)[-1:]
        if acc.is_main_process and final and final[0].name == f"step-{self.step:08d}":
            # the outputs as they are now, for a re-run to find (pipeline/resume.py)
            resuming.record_finished(final[0], self.out)
        return result


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def data_wait_hint(share: float, stage: str, loader: LoaderSection, steps: tuple[int, int]
                   ) -> str | None:
    """The one line a run prints when its step waited for data more than DATA_WAIT_HINT of the
    time over a log interval (once per run), or None."""
    if not share > DATA_WAIT_HINT:
        return None
    more = (f"raise {stage}.loader.num_workers (now {loader.num_workers})" if loader.decode == "cpu"
            else f"raise {stage}.loader.num_workers (now {loader.num_workers}: the workers read the "
                 f"tars)")
    device = (f", or on GPUs set {stage}.loader.decode=device" if loader.decode == "cpu" else "")
    return (f"[{stage}] the step waited for data {share:.0%} of the time (steps {steps[0]}-"
            f"{steps[1]}): the loader is the bottleneck; {more}{device} (CPU cores each variant "
            f"needs: benchmarks/RESULTS.md)")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
