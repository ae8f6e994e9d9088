"""The two training stages' one flow (pretrain, finetune): their shared flags, the training data
they read, the plan / --dry-run, the run's identity and complete config.json, claiming the output
folder (its lock, what to resume) and running the job with the exit codes. A stage supplies only
how it builds its model (`Built`); everything the engine needs is computed here, once, and handed
to pipeline.train as a `Job`."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline import resume as resuming
from pipeline import runtime, train
from pipeline.checkpoint import CheckpointError
from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.data.manifest import ManifestError, SplitInfo, load_split, read_manifest, split_name
from pipeline.files import WriteError
from pipeline.lineage import data_lineage
from pipeline.model_config import ModelConfig
from pipeline.plan import Plan, dry_run_report, make_plan
from pipeline.preemption import EXIT_ABORTED, EXIT_PREEMPTED, hold_stop_signals
from pipeline.recipe import Recipe, TrainSection, write_resolved
from pipeline.resume import Identity
from pipeline.run_lock import OutLocked, RunLock


@dataclass
class Built:
    """What a training stage builds before training: the model, its config.json (without the
    run's facts, which the flow adds), and what the stage has to say about them."""
    model: nn.Module
    config: ModelConfig
    init_fingerprint: str = ""               # finetune: the initial weights, part of the identity
    messages: list[str] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)   # more for recipe.resolved.yaml


@dataclass
class TrainingData:
    """The shards a training stage reads: class names and sample count always (from the recipe
    for a dry run without shards), the splits when there are shards."""
    class_names: list[str]
    num_samples: int
    split: SplitInfo | None = None
    val_split: SplitInfo | None = None


Build = Callable[[argparse.Namespace, Recipe, TrainSection, list[str]], Built]


def training_stage(stage: str, doc: str, build: Build, argv: list[str] | None,
                   more_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A training stage's main(): parse, load the recipe (exit 2 when bad), read the data, build
    the model (`build`), plan (--dry-run prints it and exits), then claim --out and train."""
    with hold_stop_signals():            # a scheduler's stop during start-up is kept, not fatal
        ap = stage_parser(doc)
        if more_args is not None:
            more_args(ap)
        add_training_args(ap, stage)
        args = ap.parse_intermixed_args(argv)
        recipe = load_recipe_or_exit(args.recipe, args.overrides)
        section: TrainSection = getattr(recipe, stage)
        data = training_data(args, section, stage)
        built = build(args, recipe, section, data.class_names)
        plan = plan_or_exit(args, section, stage, data.num_samples, built.model, built.config)
        if runtime.is_main_process():
            for m in built.messages:
                print(f"[{stage}] {m}")
        assert data.split is not None                      # --shards is required past a dry run
        identity = Identity(stage, resuming.settings(section), tuple(data.split.urls),
                            tuple(data.split.shard_lengths), built.init_fingerprint)
        config = built.config.with_lineage(                # the run's facts, known now
            stage=stage, step=plan.total_steps, fingerprint=identity.fingerprint,
            mixed_precision=runtime.mixed_precision(section.precision))
        job = train.Job(stage, section, built.model, config, data.split, data.val_split, plan,
                        identity, args.out, resume=args.resume, sample_log=args.sample_log)
        # written once the output folder is this run's (its lock, a run to continue or start)
        return train_and_finish(job, args, lambda: write_resolved(
            recipe, stage, args.out,
            {**plan.as_dict(), **built.resolved, **data_lineage(args.shards, args.shard_url)},
            args.overrides))


def add_training_args(ap: argparse.ArgumentParser, stage: str) -> None:
    """The options pretrain and finetune share: data, output, resume, dry run, audits."""
    ap.add_argument("--shards", type=Path, help="shard folder with _info.json (train split)")
    ap.add_argument("--shard-url", metavar="TEMPLATE",
                    help="read the tars from object storage / HTTP, e.g. "
                         "'pipe:aws s3 cp s3://bucket/shards/{name} -' (manifest from --shards)")
    ap.add_argument("--out", type=Path, default=Path(f"runs/{stage}"), help="output folder")
    ap.add_argument("--resume", default="auto",
                    help="auto: continue the newest complete checkpoint of these settings (refuse "
                         "when --out holds only other settings' checkpoints); matching: the same, "
                         "else start beside them (dvc.yaml); none: train from step 0 (removes "
                         "these settings' checkpoints); or a checkpoint folder")
    ap.add_argument("--break-lock", action="store_true",
                    help="take --out even if a run on another host holds its lock (run.lock): "
                         "only when that run is certainly dead")
    ap.add_argument("--dry-run", nargs="?", const="text", choices=["text", "json"],
                    help="print the resolved plan and exit (no training, shards optional)")
    ap.add_argument("--sample-log", type=Path, metavar="DIR",
                    help="write the sample keys each process trains on to DIR/rank<N>.jsonl (audits)")
    ap.add_argument("--processes", type=int, default=None,
                    help="processes to plan for with --dry-run (default: this launch)")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of a stop (data errors, NaN, signals)")


def training_data(args: argparse.Namespace, section: TrainSection, stage: str) -> TrainingData:
    """The training (and, if the shards have one, validation) split; for a dry run without shards
    the recipe's sample count and 1,000 classes."""
    if args.shards is not None:
        try:
            manifest = read_manifest(args.shards)
            split = load_split(args.shards, "train", args.shard_url)
            has_val = split_name(manifest["splits"], "val") is not None
            val = load_split(args.shards, "val", args.shard_url) if has_val else None
        except ManifestError as e:
            fail(str(e))
        names = manifest.get("class_names") or range(split.num_classes)
        return TrainingData([str(c) for c in names], split.num_samples, split, val)
    if args.dry_run:
        if section.expected_samples is None:
            fail(f"--dry-run without --shards needs {stage}.expected_samples in the recipe")
        return TrainingData([str(i) for i in range(1000)], section.expected_samples)
    fail("--shards is required (the output folder of the shard stage)")


def train_and_finish(job: train.Job, args: argparse.Namespace,
                     write_recipe: Callable[[], object]) -> int:
    """Claim `job.out` (its lock, then what `--resume` continues: pipeline/resume.py), write the
    resolved recipe (`write_recipe`) and run the job (pipeline.train: checkpoints, model
    folder, metrics.json). The ends a user can meet, each as one line (a traceback with --debug):
        0   finished (or finished before: nothing to do, or its outputs put back)
        1   stopped: the loss became NaN or infinite, training data could not be read, or an
            output could not be written (disk full, read-only)
        2   --out is held by a live run, or holds checkpoints of other settings (nothing written)
        75  stopped by SIGTERM / SIGUSR1 / SIGINT with a complete checkpoint: run the same
            command again to resume (a scheduler can requeue on 75; <out>/PREEMPTED.json too)
        130 aborted by a second Ctrl-C (the newest complete checkpoint is intact)"""
    decision, lock = claim_out(job, args.break_lock)
    try:
        if decision.kind == "finished":
            return _finished(job, Path(decision.checkpoint))
        if runtime.is_main_process():
            if decision.note:
                print(f"[{job.stage}] {decision.note}", flush=True)
            write_recipe()
        job = dataclasses.replace(job, resume=decision.checkpoint or "none")
        return _train(job, args.debug)
    except WriteError as e:
        if args.debug:
            raise
        _fail_once(str(e), code=1)
    finally:
        if lock is not None:
            lock.release()
    return 0


def claim_out(job: train.Job, break_lock: bool = False
              ) -> tuple[resuming.Decision, RunLock | None]:
    """On the first process: take `job.out`'s lock, then decide what the run continues; every
    process gets the decision. Exits 2 (one line, nothing written) when a live run holds the
    folder or its checkpoints cannot be continued with these settings."""
    lock, verdict = None, None
    if runtime.is_main_process():
        try:
            lock = RunLock.acquire(job.out, break_lock)
            verdict = resuming.decide(job.out, job.identity, job.resume, job.plan.total_steps)
        except (OutLocked, resuming.Refused, CheckpointError) as e:
            if lock is not None:
                lock.release()
            verdict = str(e)
    if runtime.num_processes() > 1:
        from accelerate.utils import broadcast_object_list
        verdict = broadcast_object_list([verdict])[0]
    if isinstance(verdict, str):
        _fail_once(verdict, code=2)
    return verdict, lock


def _finished(job: train.Job, checkpoint: Path) -> int:
    """The run in `job.out` is finished: say so in one line, after putting back any of its
    outputs that something removed or replaced (`dvc repro -f`, another experiment's)."""
    if runtime.is_main_process():
        differ = resuming.outputs_differ(checkpoint, job.out)
        if differ:
            resuming.restore_outputs(checkpoint, job.out, differ)
        done = (f"put back {', '.join(differ)} as the run left them" if differ else
                "nothing to do (its outputs are as it left them)")
        steps = job.plan.total_steps
        print(f"[{job.stage}] {job.out} is finished: step {steps} of {steps} ({checkpoint}); "
              f"{done}. To train again from step 0: --resume none", flush=True)
    return 0


def _train(job: train.Job, debug: bool) -> int:
    try:
        train.run(job)
    except train.Preempted as e:
        if debug:
            raise
        if runtime.is_main_process():
            print(f"[{job.stage}] stopped by {e.signame} after step {e.step}: checkpoint "
                  f"{e.checkpoint}; resume with the same command (exit {EXIT_PREEMPTED}: "
                  f"requeue)", flush=True)
        sys.exit(EXIT_PREEMPTED)
    except (train.NonFiniteLoss, train.DataError) as e:
        if debug:
            raise
        _fail_once(str(e), code=1)
    except KeyboardInterrupt:
        if debug:
            raise
        _fail_once(f"[{job.stage}] aborted by a second Ctrl-C; the newest complete checkpoint "
                   f"under {job.out / 'checkpoints'} is intact", code=EXIT_ABORTED)
    return 0


def _fail_once(message: str, code: int) -> None:
    """Every process stops together; one of them says why."""
    if runtime.is_main_process():
        fail(message, code)
    sys.exit(code)


def plan_or_exit(args: argparse.Namespace, section: TrainSection, stage: str, num_samples: int,
                 model, config: ModelConfig) -> Plan:
    """The run's plan; with --dry-run, print it and exit 0. A plan that cannot work exits 2."""
    processes = args.processes if args.dry_run and args.processes else runtime.num_processes()
    if processes < 1:
        fail(f"--processes {processes}: give a positive number of processes")
    try:
        plan = make_plan(section, num_samples, processes)
    except ValueError as e:
        fail(f"{args.recipe}: {stage}: {e}")
    if args.dry_run:
        print(dry_run_report(plan, section, model, config, args.dry_run))
        sys.exit(0)
    return plan
