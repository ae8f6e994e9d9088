"""What a training run does with an output folder that already holds a run (pipeline/resume.py):
a finished run is left as it is (and its outputs put back when something removed them), a stopped
run with other settings is refused naming each key, keys that may change across a resume do not
stop it, PREEMPTED.json goes only with the run that continues it. In-process runs: the process
boundary is not what these test (signals and locks across processes: tests/test_preemption.py;
`dvc repro -f` on a finished stage: tests/test_dvc.py)."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import ROOT, run_stage_in_process
from pipeline import checkpoint as ckpt
from pipeline.preemption import EXIT_PREEMPTED
from pipeline.recipe import load_recipe
from pipeline.resume import MAY_CHANGE_ON_RESUME, settings
from pipeline.step import StepRunner

RECIPE = str(ROOT / "recipes" / "demo.yaml")
# 11 steps; dvclive on (its plots are outputs too)
RUN = ["pretrain.epochs=1", "pretrain.warmup_epochs=0.5", "pretrain.train_res=32",
       "pretrain.test_res=32", "pretrain.micro_batch=32", "pretrain.eval_every=0",
       "pretrain.loader.num_workers=1", "pretrain.loader.shuffle_block=64"]


def pretrain(shards, out, *extra, check=True):
    return run_stage_in_process("pretrain", "--recipe", RECIPE, "--shards", shards, "--out", out,
                                *RUN, *extra, check=check, threads=1)


def outputs(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `out` with its bytes and mtime (ns)."""
    return {p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def lines(p, prefix) -> list[str]:
    return [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(prefix)]


@pytest.mark.integration
def test_the_same_command_on_a_finished_out_changes_nothing_and_puts_back_what_was_removed(
        demo_shards, tmp_path):
    shards, out = demo_shards["pretrain"], tmp_path / "run"
    pretrain(shards, out)
    first = outputs(out)
    assert "dvclive/plots/metrics/train/loss.tsv" in first and "model/ema.safetensors" in first

    again = pretrain(shards, out)                  # the same command: nothing changes
    said = lines(again, "[pretrain]")
    assert len(said) == 1 and "is finished: step 11 of 11" in said[0] and "nothing to do" in said[0]
    assert "--resume none" in said[0] and "train_loss" not in again.stdout
    assert outputs(out) == first                   # bytes and mtimes, checkpoints included

    # what `dvc repro -f` removes before it runs the command: the stage's outputs
    for gone in ("model", "dvclive/plots"):
        shutil.rmtree(out / gone)
    for gone in ("metrics.json", "recipe.resolved.yaml"):
        (out / gone).unlink()
    back = pretrain(shards, out)
    said = lines(back, "[pretrain]")
    assert len(said) == 1 and "put back model/, metrics.json, recipe.resolved.yaml, dvclive/" in said[0]
    assert {k: v[0] for k, v in outputs(out).items()} == {k: v[0] for k, v in first.items()}

    fresh = pretrain(shards, out, "--resume", "none")     # an explicit new run trains again
    assert "--resume none: removed 1 checkpoint(s) of these settings" in fresh.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 11
    assert "is finished" not in fresh.stdout and "resumed from" not in fresh.stdout


def _stop_at_step_3(monkeypatch):
    """SIGTERM to this process after step 3 (a real signal; the stage's handler records it)."""
    real = StepRunner.step

    def step(self, index):
        loss = real(self, index)
        if index + 1 == 3:                       # the third optimiser step is done
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    monkeypatch.setattr(StepRunner, "step", step)
    return lambda: monkeypatch.setattr(StepRunner, "step", real)


@pytest.mark.integration
def test_a_changed_recipe_is_refused_naming_each_key_and_micro_batch_may_change(
        demo_shards, tmp_path, monkeypatch):
    shards, out = demo_shards["pretrain"], tmp_path / "run"
    undo = _stop_at_step_3(monkeypatch)
    stopped = pretrain(shards, out, check=False)
    undo()
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    marker = json.loads((out / "PREEMPTED.json").read_text())
    before = outputs(out)

    changed = pretrain(shards, out, "pretrain.lr_base=0.2", "pretrain.augment.hflip=true",
                       check=False)
    assert changed.returncode == 2
    error = changed.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert "pretrain.lr_base: 0.4 -> 0.2" in error[0] and "pretrain.augment.hflip: False -> True" in error[0]
    assert "a stopped run: PREEMPTED.json" in error[0] and marker["checkpoint"] in error[0]
    assert "--resume none" in error[0] and "new --out" in error[0]
    assert outputs(out) == before                  # nothing written, the marker kept

    # `--resume matching` (dvc.yaml's) starts beside them; finishing, it leaves the other
    # settings' marker for the run that resumes from it
    beside = pretrain(shards, out, "pretrain.lr_base=0.2", "--resume", "matching")
    assert "resumed from" not in beside.stdout
    assert json.loads((out / "PREEMPTED.json").read_text()) == marker

    resumed = pretrain(shards, out, "pretrain.micro_batch=16", "pretrain.loader.num_workers=2")
    assert f"resumed from {marker['checkpoint']} at step 3" in resumed.stdout
    assert not (out / "PREEMPTED.json").exists()


def test_the_keys_that_may_change_across_a_resume_are_left_out_of_the_settings():
    section = load_recipe(RECIPE).pretrain
    keys = settings(section)
    assert not set(MAY_CHANGE_ON_RESUME) & set(keys)
    assert {"micro_batch", "loader", "trackers", "checkpoint_every"} <= set(MAY_CHANGE_ON_RESUME)
    assert {"global_batch", "lr_base", "clip_factor", "augment", "model", "seed"} <= set(keys)
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{k}`" in readme for k in MAY_CHANGE_ON_RESUME), "README: keys that may change"


@pytest.mark.integration
def test_a_run_resumed_at_its_last_step_without_a_record_finishes_with_the_stored_loss(
        demo_shards, tmp_path):
    """A run killed between its last checkpoint and the end of finish(): the same command
    finishes it (0 steps) with the last loss and rate the checkpoint kept, not NaN and 0."""
    shards, out = demo_shards["pretrain"], tmp_path / "run"
    pretrain(shards, out)
    metrics = json.loads((out / "metrics.json").read_text())
    final = ckpt.complete_checkpoints(next((out / "checkpoints").iterdir()))[-1]
    shutil.rmtree(final / "finished")
    for gone in ("model", "dvclive/plots"):          # and `dvc repro` removed the outputs
        shutil.rmtree(out / gone)
    pretrain(shards, out)
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_loss"] == metrics["train_loss"] and again["img_per_s"] == metrics["img_per_s"]
    assert again["val_top1_ema"] == metrics["val_top1_ema"] and (final / "finished").is_dir()
    assert (out / "dvclive/plots/metrics/train/loss.tsv").is_file()   # from the checkpoint
