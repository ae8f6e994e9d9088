"""Command-line plumbing of the two training stages (pretrain, finetune): their shared flags, the
training data they read, the plan / --dry-run, and running the job with the exit codes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import runtime, train
from pipeline.cli import fail
from pipeline.data.manifest import ManifestError, load_split, read_manifest
from pipeline.plan import Plan, dry_run_report, make_plan
from pipeline.preemption import EXIT_ABORTED, EXIT_PREEMPTED
from pipeline.recipe import TrainSection


def add_training_args(ap: argparse.ArgumentParser, stage: str) -> None:
    """The options pretrain and finetune share: data, output, resume, dry run, audits."""
    ap.add_argument("--shards", type=Path, help="shard folder with _info.json (train split)")
    ap.add_argument("--shard-url", metavar="TEMPLATE",
                    help="read the tars from object storage / HTTP, e.g. "
                         "'pipe:aws s3 cp s3://bucket/shards/{name} -' (manifest from --shards)")
    ap.add_argument("--out", type=Path, default=Path(f"runs/{stage}"), help="output folder")
    ap.add_argument("--resume", default="auto",
                    help="auto (newest complete checkpoint of this recipe), none, or a checkpoint folder")
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


def train_and_finish(job: train.Job, debug: bool = False) -> int:
    """Run a training job (pipeline.train: checkpoints, model folder, metrics.json). The ends a
    user can meet, each as one line (a traceback with --debug):
        0   finished
        1   stopped: the loss became NaN or infinite, or training data could not be read
        75  stopped by SIGTERM / SIGUSR1 / SIGINT with a complete checkpoint: run the same
            command again to resume (a scheduler can requeue on 75; <out>/PREEMPTED.json too)
        130 aborted by a second Ctrl-C (the newest complete checkpoint is intact)"""
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
