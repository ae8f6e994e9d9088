"""Preemption with real signals (pipeline/preemption.py): SIGTERM / SIGUSR1 / SIGINT stop every
process at one step boundary with one checkpoint and exit 75; a resumed run is bit-identical to
an uninterrupted one; a second Ctrl-C aborts at once. 1 process and 2 (torchrun, gloo)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ONE_THREAD, ROOT, run, run_stage
from pipeline import checkpoint as ckpt
from pipeline import train
from pipeline.preemption import EXIT_ABORTED, EXIT_PREEMPTED

RECIPE = str(ROOT / "recipes" / "demo.yaml")
# 22 steps of 2 micro-batches; checkpoints only at the end unless a signal asks for one
RUN = ["pretrain.epochs=2", "pretrain.warmup_epochs=0.5", "pretrain.train_res=32",
       "pretrain.test_res=32", "pretrain.micro_batch=32", "pretrain.eval_every=0",
       "pretrain.trackers=[]", "pretrain.loader.num_workers=1", "pretrain.loader.shuffle_block=64"]


def args(shards, out, *extra):
    return ["--recipe", RECIPE, "--shards", str(shards), "--out", str(out), *RUN, *extra]


def weights(out: Path) -> dict:
    return {n: load_file(str(out / "model" / n)) for n in ("model.safetensors", "ema.safetensors")}


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        worst = max((wa[name][k] - wb[name][k]).abs().max().item() for k in wa[name])
        assert worst == 0.0, f"{name}: max abs difference {worst}"


def start(cmd, env=None) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1",
                                            **(env or {})})


def wait_for_steps(keys: Path, steps: int, proc: subprocess.Popen, timeout=300) -> None:
    """Until the sample-key logs record `steps` steps (the run is mid-way, not starting)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list(keys.glob("rank*.jsonl"))
        if logs and all(len({json.loads(x)["step"] for x in f.read_text().splitlines()}) >= steps
                        for f in logs):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("the run did not get going")


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("preempt") / "full"
    run_stage("pretrain", *args(demo_shards["pretrain"], out), env=ONE_THREAD)
    return out


# SIGUSR1 (Slurm's) is also the two-process and before-the-first-step tests' signal, and SIGINT the
# second-Ctrl-C test's: their full run here is in the slow suite
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_stops_with_one_checkpoint_and_the_resume_is_bit_identical(
        reference, demo_shards, tmp_path, sig):
    out, keys = tmp_path / "run", tmp_path / "keys"
    proc = start([sys.executable, ROOT / "stages" / "pretrain.py",
                  *args(demo_shards["pretrain"], out), "--log-samples", keys])
    wait_for_steps(keys, 6, proc)
    proc.send_signal(sig)
    code, stdout, stderr = finish(proc)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stops = [ln for ln in stdout.splitlines() if ln.startswith("[pretrain] stopped by")]
    assert len(stops) == 1 and signal.Signals(sig).name in stops[0]
    marker = json.loads((out / "PREEMPTED.json").read_text())
    found = ckpt.complete_checkpoints(next((out / "checkpoints").iterdir()))
    assert [c.name for c in found] == [f"step-{marker['step']:08d}"] and 6 <= marker["step"] < 22
    assert stops[0].endswith("resume with the same command (exit 75: requeue)")
    assert not (out / "model").exists()
    resumed = run_stage("pretrain", *args(demo_shards["pretrain"], out), env=ONE_THREAD)
    assert f"resumed from {found[0]}" in resumed.stdout
    assert not (out / "PREEMPTED.json").exists()
    assert_bit_identical(reference, out)


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_checkpoints(demo_shards, tmp_path):
    out, keys = tmp_path / "run", tmp_path / "keys"
    proc = start([sys.executable, ROOT / "stages" / "pretrain.py",
                  *args(demo_shards["pretrain"], out, "pretrain.checkpoint_every=3",
                        "pretrain.train_res=96"),            # ~1 s steps: room for two Ctrl-C
                  "--log-samples", keys])
    wait_for_steps(keys, 5, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)                               # two separate signals, not one merged pending
    proc.send_signal(signal.SIGINT)               # before the step in progress can end
    code, stdout, stderr = finish(proc)
    assert code == EXIT_ABORTED, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "aborted by a second Ctrl-C" in lines[0]
    assert "Traceback" not in stderr
    for c in ckpt.complete_checkpoints(next((out / "checkpoints").iterdir())):
        assert load_file(str(c / "model.safetensors"))          # complete and readable
    assert not list((out / "checkpoints").rglob("*.tmp"))      # nothing half-written left


def _job(shards, out):
    from pipeline.recipe import load_recipe
    from pipeline.variants import build_model
    section = load_recipe(RECIPE, RUN).pretrain
    model, arch, model_args = build_model("tiny", 5, seed=section.seed)
    config = {"architecture": arch, "model_args": model_args, "num_classes": 5,
              "pretrained_cfg": {"test_input_size": [3, 32, 32], "crop_pct": 1.0}}
    return train.Job("pretrain", section, model, shards, out, config)


def test_a_signal_during_a_checkpoint_write_lets_it_finish_and_stops_after_it(
        demo_shards, tmp_path, monkeypatch):
    """In-process: the real SIGTERM arrives while the step-3 checkpoint is being written (from
    inside the write); the write completes, the run stops at the next boundary, and that one
    checkpoint is not written twice."""
    real_save = ckpt.save_checkpoint
    calls = []

    def save_with_a_signal(root, step, *a, **kw):
        calls.append(step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)          # handled at once: sets the request
        return real_save(root, step, *a, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_with_a_signal)
    job = _job(demo_shards["pretrain"], tmp_path)
    job.section.checkpoint_every = 3
    with pytest.raises(train.Preempted) as e:
        train.run(job)
    assert calls == [3] and e.value.step == 3 and e.value.signame == "SIGTERM"
    found = ckpt.complete_checkpoints(next((tmp_path / "checkpoints").iterdir()))
    assert [c.name for c in found] == ["step-00000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL    # handlers restored


def test_a_signal_before_the_first_step_checkpoints_step_0(demo_shards, tmp_path, monkeypatch):
    real_open = train.Trainer.open_data

    def open_then_signal(self, keys_log=None):
        real_open(self, keys_log)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train.Trainer, "open_data", open_then_signal)
    with pytest.raises(train.Preempted) as e:
        train.run(_job(demo_shards["pretrain"], tmp_path))
    assert e.value.step == 0 and e.value.signame == "SIGUSR1"
    found = ckpt.complete_checkpoints(next((tmp_path / "checkpoints").iterdir()))
    assert [c.name for c in found] == ["step-00000000"]
    monkeypatch.setattr(train.Trainer, "open_data", real_open)
    result = train.run(_job(demo_shards["pretrain"], tmp_path))       # resumes from step 0
    assert result.resumed_from_step == 0 and result.steps == 22


def test_two_processes_stop_together_when_only_one_is_signalled(demo_shards, tmp_path):
    """SLURM signals the batch step alone: here only rank 1 gets SIGUSR1. Both ranks stop after
    the same step (one checkpoint), and the resumed 2-process run equals an uninterrupted one."""
    shards = demo_shards["pretrain"]
    two = ["pretrain.micro_batch=16", "pretrain.loader.num_workers=1"]
    ref = tmp_path / "ref"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         ROOT / "stages" / "pretrain.py", *args(shards, ref, *two)], env=ONE_THREAD)
    out, keys = tmp_path / "run", tmp_path / "keys"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           ROOT / "stages" / "pretrain.py", *args(shards, out, *two), "--log-samples", keys]
    proc = start(cmd)
    wait_for_steps(keys, 6, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)
    code, stdout, stderr = finish(proc)
    assert code != 0                               # torchrun reports a non-zero worker exit as 1
    assert "exitcode  : 75" in stderr               # ... and says it was 75
    marker = json.loads((out / "PREEMPTED.json").read_text())
    assert marker["signal"] == "a signal to another process"      # rank 0 got none itself
    found = ckpt.complete_checkpoints(next((out / "checkpoints").iterdir()))
    assert [c.name for c in found] == [f"step-{marker['step']:08d}"]
    steps = {f.name: max(json.loads(x)["step"] for x in f.read_text().splitlines())
             for f in keys.glob("rank*.jsonl")}
    assert len(steps) == 2 and len(set(steps.values())) == 1      # the same last step on both
    assert stdout.count("[pretrain] stopped by") == 1              # one line, from rank 0
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         ROOT / "stages" / "pretrain.py", *args(shards, out, *two)], env=ONE_THREAD)
    assert_bit_identical(ref, out)


def _rank_pid(agent: int, rank: int) -> int:
    """The pid of a torchrun worker by its RANK (read from /proc)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
        for pid in children:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under {agent}")


def test_a_signal_while_the_stage_starts_is_kept_until_the_first_boundary(demo_shards, tmp_path):
    """SIGTERM as soon as the stage has written its resolved recipe (the model is built, the
    data not yet opened): no kill mid-start; a checkpoint at the first boundary, exit 75."""
    out = tmp_path / "run"
    proc = start([sys.executable, ROOT / "stages" / "pretrain.py", *args(demo_shards["pretrain"], out)])
    deadline = time.time() + 120
    while not (out / "recipe.resolved.yaml").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(proc)
    assert code == EXIT_PREEMPTED, stderr[-3000:]
    marker = json.loads((out / "PREEMPTED.json").read_text())
    assert marker["step"] <= 1 and Path(marker["checkpoint"]).is_dir()
