"""Command-line plumbing of the two training stages (pretrain, finetune): their shared flags, the
training data they read, the plan / --dry-run, claiming the output folder (its lock, what to
resume) and running the job with the exit codes."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import resume as resuming
from pipeline import runtime, train
from pipeline.checkpoint import CheckpointError
from pipeline.cli import fail
from pipeline.data.manifest import ManifestError, load_split, read_manifest
from pipeline.files import WriteError
from pipeline.plan import Plan, dry_run_report, make_plan
from pipeline.preemption import EXIT_ABORTED, EXIT_PREEMPTED
from pipeline.recipe import TrainSection
from pipeline.run_lock import OutLocked, RunLock


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
    ap.add_argument("--log-samples", type=Path, metavar="DIR",
                    help="write the sample keys each process trains on to DIR/rank<N>.jsonl (audits)")
    ap.add_argument("--processes", type=int, default=None,
                    help="processes to plan for with --dry-run (default: this launch)")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of a stop (data errors, NaN, signals)")


def training_data(args: argparse.Namespace, section: TrainSection, stage: str
                  ) -> tuple[list[str], int]:
    """(class names, train sample count) from the shards, or from the recipe for a dry run."""
    if args.shards is not None:
        try:
            info = read_manifest(args.shards)
            split = load_split(args.shards, "train", args.shard_url)
        except ManifestError as e:
            fail(str(e))
        names = info.get("class_names") or range(split.num_classes)
        return [str(c) for c in names], split.num_samples
    if args.dry_run:
        if section.expected_samples is None:
            fail(f"--dry-run without --shards needs {stage}.expected_samples in the recipe")
        return [str(i) for i in range(1000)], section.expected_samples
    fail("--shards is required (the output folder of the shard stage)")


def train_and_finish(job: train.Job, plan: Plan, args: argparse.Namespace,
                     write_resolved: Callable[[], object]) -> int:
    """Claim `job.out` (its lock, then what `--resume` continues: pipeline/resume.py), write the
    resolved recipe (`write_resolved`) and run the job (pipeline.train: checkpoints, model
    folder, metrics.json). The ends a user can meet, each as one line (a traceback with --debug):
        0   finished (or finished before: nothing to do, or its outputs put back)
        1   stopped: the loss became NaN or infinite, training data could not be read, or an
            output could not be written (disk full, read-only)
        2   --out is held by a live run, or holds checkpoints of other settings (nothing written)
        75  stopped by SIGTERM / SIGUSR1 / SIGINT with a complete checkpoint: run the same
            command again to resume (a scheduler can requeue on 75; <out>/PREEMPTED.json too)
        130 aborted by a second Ctrl-C (the newest complete checkpoint is intact)"""
    decision, lock = claim_out(job, plan, args.break_lock)
    try:
        if decision.kind == "finished":
            return _finished(job, plan, Path(decision.checkpoint))
        if runtime.is_main_process():
            if decision.note:
                print(f"[{job.stage}] {decision.note}", flush=True)
            write_resolved()
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


def claim_out(job: train.Job, plan: Plan, break_lock: bool = False
              ) -> tuple[resuming.Decision, RunLock | None]:
    """On the first process: take `job.out`'s lock, then decide what the run continues; every
    process gets the decision. Exits 2 (one line, nothing written) when a live run holds the
    folder or its checkpoints cannot be continued with these settings."""
    lock, verdict = None, None
    if runtime.is_main_process():
        try:
            lock = RunLock.acquire(job.out, break_lock)
            split = load_split(job.shards, "train", job.shard_url)
            verdict = resuming.decide(job.out, train.identity(job, split), job.resume,
                                      plan.total_steps)
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


def _finished(job: train.Job, plan: Plan, checkpoint: Path) -> int:
    """The run in `job.out` is finished: say so in one line, after putting back any of its
    outputs that something removed or replaced (`dvc repro -f`, another experiment's)."""
    if runtime.is_main_process():
        differ = resuming.outputs_differ(checkpoint, job.out)
        if differ:
            resuming.restore_outputs(checkpoint, job.out, differ)
        done = (f"put back {', '.join(differ)} as the run left them" if differ else
                "nothing to do (its outputs are as it left them)")
        print(f"[{job.stage}] {job.out} is finished: step {plan.total_steps} of "
              f"{plan.total_steps} ({checkpoint}); {done}. To train again from step 0: "
              f"--resume none", flush=True)
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
                 model, config: dict) -> Plan:
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
