"""Preemption with real signals (pipeline/preemption.py): SIGTERM / SIGUSR1 / SIGINT, to the
training process, to its process group (its loader workers too) or to torchrun, stop every
process at one step boundary with one checkpoint and exit 75; a resumed run is bit-identical to
an uninterrupted one; a second Ctrl-C aborts with 130 whenever it comes; loader workers survive
stop signals and end with the training process. 1 process and 2 (torchrun, gloo). No test waits
a time sized to a step: each waits for an event (sample keys logged, a line, a file)."""
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ONE_THREAD, ROOT, run, run_stage, run_stage_in_process, tiny_pretrain_job
from pipeline import checkpoint as ckpt
from pipeline import model_dir, train
from pipeline.preemption import EXIT_ABORTED, EXIT_PREEMPTED
from pipeline.run_lock import LOCK_NAME
from pipeline.step import StepRunner

pytestmark = pytest.mark.integration   # real stop signals to stages, process groups and torchrun

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


def start(cmd, env=None, group=False) -> subprocess.Popen:
    """A real stage process (`group`: in a process group of its own, to signal the group)."""
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group,
                            env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for_line(proc: subprocess.Popen, text: str, timeout=120) -> list[str]:
    """Read `proc`'s stdout until a line holds `text` (the lines read so far)."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            assert line, f"the process ended before '{text}': {proc.communicate()}"
            lines.append(line)
            if text in line:
                return lines
    pytest.fail(f"no line with '{text}' within {timeout} s: {lines[-5:]}")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if d.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(d.name))
    return found


def wait_until_gone(pids, timeout=10.0) -> list[int]:
    """The pids still alive (not zombies) after up to `timeout` seconds."""
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


# SIGTERM goes to the process group (`timeout`, `kill -- -PGID`, systemd, `scancel` without
# --batch): the loader worker gets it too. SIGUSR1 (Slurm's) is also the two-process and
# before-the-first-step tests' signal, and SIGINT the second-Ctrl-C test's: their full run here,
# to the training process alone, is in the slow suite
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_stops_with_one_checkpoint_and_the_resume_is_bit_identical(
        reference, demo_shards, tmp_path, sig):
    out, keys = tmp_path / "run", tmp_path / "keys"
    to_group = sig == signal.SIGTERM
    proc = start([sys.executable, ROOT / "stages" / "pretrain.py",
                  *args(demo_shards["pretrain"], out), "--sample-log", keys], group=to_group)
    wait_for_steps(keys, 6, proc)
    if to_group:
        assert len(group_members(proc.pid)) == 2          # the training process and its worker
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    code, stdout, stderr = finish(proc)
    assert not wait_until_gone(group_members(proc.pid))   # no worker left behind
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


def assert_a_second_run_is_refused(shards, out: Path, holder_pid: int) -> None:
    """A second run into `out`, which a live run holds: exit 2 at once, one line naming the
    holder (host, pid, start time), nothing written."""
    lock, resolved = out / LOCK_NAME, out / "recipe.resolved.yaml"
    held, written = lock.read_text(), resolved.stat().st_mtime_ns
    second = run_stage_in_process("pretrain", *args(shards, out), check=False)
    assert second.returncode == 2, second.stderr
    holder = json.loads(held)
    error = second.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "in use by another run" in error[0]
    assert f"pid {holder_pid}" in error[0] and holder["host"] in error[0]
    assert holder["started"] in error[0]
    assert lock.read_text() == held and resolved.stat().st_mtime_ns == written   # nothing written


def test_one_writer_per_out_and_a_lock_left_by_kill_9_does_not_block_the_resume(
        demo_shards, tmp_path):
    """A second run into a folder that a live run holds is refused (the holder is frozen with
    SIGSTOP meanwhile: alive, and certain not to finish first). SIGKILL then leaves the lock
    behind (and no loader worker); the same command resumes from the newest checkpoint."""
    shards, out, keys = demo_shards["pretrain"], tmp_path / "run", tmp_path / "keys"
    proc = start([sys.executable, ROOT / "stages" / "pretrain.py",
                  *args(shards, out, "pretrain.checkpoint_every=3"), "--sample-log", keys])
    wait_for_steps(keys, 4, proc)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGSTOP)
    assert_a_second_run_is_refused(shards, out, proc.pid)
    proc.kill()
    proc.communicate()
    assert (out / LOCK_NAME).exists() and not wait_until_gone(workers)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid
    resumed = run_stage_in_process("pretrain", *args(shards, out), threads=1)
    assert "resumed from" in resumed.stdout and not (out / LOCK_NAME).exists()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 22


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_checkpoints(demo_shards, tmp_path):
    """Ctrl-C to the process group (as a terminal sends it), then again as soon as the run says
    it received the first: wherever the second lands (in the step, in the stop checkpoint, after
    it), the run aborts with 130 and one line."""
    out, keys = tmp_path / "run", tmp_path / "keys"
    proc = start([sys.executable, ROOT / "stages" / "pretrain.py",
                  *args(demo_shards["pretrain"], out, "pretrain.checkpoint_every=3"),
                  "--sample-log", keys], group=True)
    wait_for_steps(keys, 5, proc)
    os.killpg(proc.pid, signal.SIGINT)
    wait_for_line(proc, "SIGINT received")       # two separate signals, not one merged pending
    os.killpg(proc.pid, signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == EXIT_ABORTED, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "aborted by a second Ctrl-C" in lines[0]
    assert "Traceback" not in stderr
    for c in ckpt.complete_checkpoints(next((out / "checkpoints").iterdir())):
        assert load_file(str(c / "model.safetensors"))          # complete and readable
    assert not list((out / "checkpoints").rglob("*.tmp"))      # nothing half-written left
    assert not (out / LOCK_NAME).exists()
    assert not wait_until_gone(group_members(proc.pid))


@pytest.mark.parametrize("phase", ["in start-up", "in a step", "in the stop checkpoint",
                                   "after the stop checkpoint"])
def test_a_second_ctrl_c_exits_130_before_during_and_after_the_stop_checkpoint(
        demo_shards, tmp_path, monkeypatch, phase):
    """In-process, each moment made certain: both SIGINTs before the run's set-up, or the first
    after step 3 and the second from inside the run at `phase`. The run ends with 130
    (SystemExit), no checkpoint half-written, the one of step 3 (the stop checkpoint) complete
    or absent, never torn."""
    def kill_at(obj, name, when):
        real = getattr(obj, name)

        def wrapped(*a, **kw):
            if when == "before":
                os.kill(os.getpid(), signal.SIGINT)
            result = real(*a, **kw)
            if when == "after":
                os.kill(os.getpid(), signal.SIGINT)
            return result
        monkeypatch.setattr(obj, name, wrapped)

    real_step = StepRunner.step

    def step_then_first_ctrl_c(self, step):
        loss = real_step(self, step)
        if step + 1 == 3:                        # the third optimiser step is done
            os.kill(os.getpid(), signal.SIGINT)
            if phase == "in a step":            # the second before this step's end
                os.kill(os.getpid(), signal.SIGINT)
            else:
                # after the stop checkpoint's first weights file; after PREEMPTED.json
                kill_at(*{"in the stop checkpoint": (model_dir, "save_file", "after"),
                          "after the stop checkpoint": (train, "atomic_write_text", "after")}[phase])
        return loss
    monkeypatch.setattr(StepRunner, "step", step_then_first_ctrl_c)
    if phase == "in start-up":
        real_resume = train.Trainer.resume

        def two_ctrl_c_then_resume(self):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return real_resume(self)
        monkeypatch.setattr(train.Trainer, "resume", two_ctrl_c_then_resume)
    with pytest.raises(SystemExit) as e:
        train.run(_job(demo_shards["pretrain"], tmp_path))
    assert e.value.code == EXIT_ABORTED
    assert not list(tmp_path.rglob("*.tmp"))                       # nothing half-written
    found = [c.name for c in (tmp_path / "checkpoints").glob("*/step-*")]
    assert found == (["step-00000003"] if phase == "after the stop checkpoint" else [])
    assert (tmp_path / "PREEMPTED.json").exists() == (phase == "after the stop checkpoint")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored


def test_a_second_ctrl_c_after_main_returned_still_exits_130(tmp_path):
    """The stage's last instants (main() returned 75, the interpreter shutting down): the
    handler stays (stage_exit) and the second Ctrl-C exits 130 with its line."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import atexit, os, signal
        from pipeline.preemption import hold_stop_signals, stage_exit

        def main():
            with hold_stop_signals():
                os.kill(os.getpid(), signal.SIGINT)          # the first: a stop
                atexit.register(os.kill, os.getpid(), signal.SIGINT)   # the second, at exit
                return 75
        stage_exit(main)
    """))
    p = run([sys.executable, script], env={"PYTHONPATH": str(ROOT)}, check=False)
    assert p.returncode == EXIT_ABORTED, p.stderr
    assert p.stderr.count("aborted by a second Ctrl-C") == 1 and "Traceback" not in p.stderr


def _job(shards, out):
    from pipeline.recipe import load_recipe
    return tiny_pretrain_job(load_recipe(RECIPE, RUN).pretrain, shards, out)


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

    @contextlib.contextmanager
    def open_then_signal(self):
        with real_open(self) as runner:
            os.kill(os.getpid(), signal.SIGUSR1)
            yield runner

    monkeypatch.setattr(train.Trainer, "open_data", open_then_signal)
    with pytest.raises(train.Preempted) as e:
        train.run(_job(demo_shards["pretrain"], tmp_path))
    assert e.value.step == 0 and e.value.signame == "SIGUSR1"
    found = ckpt.complete_checkpoints(next((tmp_path / "checkpoints").iterdir()))
    assert [c.name for c in found] == ["step-00000000"]
    monkeypatch.setattr(train.Trainer, "open_data", real_open)
    result = train.run(_job(demo_shards["pretrain"], tmp_path))       # resumes from step 0
    assert result.resumed_from_step == 0 and result.steps == 22


TWO = ["pretrain.micro_batch=16", "pretrain.loader.num_workers=1"]


def torchrun_cmd(shards, out, *extra) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            ROOT / "stages" / "pretrain.py", *args(shards, out, *TWO), *extra]


@pytest.fixture(scope="module")
def reference_two(demo_shards, tmp_path_factory):
    """The uninterrupted 2-process run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("preempt2") / "ref"
    run(torchrun_cmd(demo_shards["pretrain"], out), env=ONE_THREAD)
    return out


def test_sigterm_to_torchrun_stops_every_rank_and_the_resume_is_bit_identical(
        reference_two, demo_shards, tmp_path):
    """What Kubernetes does to a pod whose PID 1 is torchrun: SIGTERM to torchrun, which
    forwards it to each rank's process group (the ranks and their loader workers). Both ranks
    stop after the same step with one checkpoint; the run holds its folder's lock once (rank 0);
    the resumed 2-process run equals an uninterrupted one."""
    shards = demo_shards["pretrain"]
    out, keys = tmp_path / "run", tmp_path / "keys"
    proc = start(torchrun_cmd(shards, out, "--sample-log", keys))
    wait_for_steps(keys, 6, proc)
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == _rank_pid(proc.pid, 0)                 # one lock, rank 0's
    workers = [w for r in (0, 1) for w in _children(_rank_pid(proc.pid, r))]
    assert len(workers) == 2                                       # one loader worker a rank
    proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(proc)
    assert code == 1, stderr[-3000:]             # torchrun's own code when it is signalled
    assert "killed by signal" not in stderr and "DataLoader worker" not in stderr
    marker = json.loads((out / "PREEMPTED.json").read_text())
    assert marker["signal"] == "SIGTERM"
    found = ckpt.complete_checkpoints(next((out / "checkpoints").iterdir()))
    assert [c.name for c in found] == [f"step-{marker['step']:08d}"]
    assert stdout.count("[pretrain] stopped by SIGTERM") == 1
    assert not wait_until_gone(workers) and not (out / LOCK_NAME).exists()
    run(torchrun_cmd(shards, out), env=ONE_THREAD)
    assert not (out / "PREEMPTED.json").exists()
    assert_bit_identical(reference_two, out)


@pytest.mark.parametrize("resume", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_stop_together_when_only_one_is_signalled(reference_two, demo_shards,
                                                                tmp_path, resume):
    """Slurm signals the batch step alone: here only rank 1 gets SIGUSR1. Both ranks stop after
    the same step (one checkpoint), every rank names the signal (rank 0 writes PREEMPTED.json
    and the stop line without having received it). The slow variant also resumes and compares
    with an uninterrupted run (the default suite resumes a 2-process stop in the torchrun test)."""
    shards = demo_shards["pretrain"]
    out, keys = tmp_path / "run", tmp_path / "keys"
    proc = start(torchrun_cmd(shards, out, "--sample-log", keys))
    wait_for_steps(keys, 6, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)
    code, stdout, stderr = finish(proc)
    assert code != 0                               # torchrun reports a non-zero worker exit as 1
    assert "exitcode  : 75" in stderr               # ... and says it was 75
    marker = json.loads((out / "PREEMPTED.json").read_text())
    assert marker["signal"] == "SIGUSR1"            # rank 0 got none itself
    found = ckpt.complete_checkpoints(next((out / "checkpoints").iterdir()))
    assert [c.name for c in found] == [f"step-{marker['step']:08d}"]
    steps = {f.name: max(json.loads(x)["step"] for x in f.read_text().splitlines())
             for f in keys.glob("rank*.jsonl")}
    assert len(steps) == 2 and len(set(steps.values())) == 1      # the same last step on both
    assert stdout.count("[pretrain] stopped by SIGUSR1") == 1      # one line, from rank 0
    if resume:
        run(torchrun_cmd(shards, out), env=ONE_THREAD)
        assert_bit_identical(reference_two, out)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


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


LOADER = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from pipeline.preemption import ignore_stop_signals

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                time.sleep(0.01)
                yield torch.tensor([os.getpid()])

    if __name__ == "__main__":
        got = []
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):   # the training process's part
            signal.signal(s, lambda n, f: got.append(n))
        it = iter(DataLoader(Endless(), batch_size=None, num_workers=2,
                             worker_init_fn=ignore_stop_signals))
        print("workers", *sorted({int(next(it)) for _ in range(20)}), flush=True)
        sys.stdin.readline()                         # the test signals the group meanwhile
        for _ in range(20):
            next(it)                                 # the workers still deliver
        print("signals", *sorted(got), flush=True)
        if sys.argv[1] == "exit":
            sys.exit(3)                              # the loader is still open
        sys.stdin.readline()                         # the test kills this process
""")


@pytest.mark.parametrize("end", ["exit", "kill -9"])
def test_loader_workers_survive_stop_signals_and_end_with_the_training_process(tmp_path, end):
    """Real DataLoader workers set up by ignore_stop_signals: SIGTERM, SIGINT and SIGUSR1 to the
    whole group leave them delivering; an exit with the loader still open does not hang, and
    SIGKILL of the training process leaves no worker behind."""
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    proc = subprocess.Popen([sys.executable, "-W", "ignore", script, end], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers = [int(w) for w in wait_for_line(proc, "workers", 60)[-1].split()[1:]]
    assert len(workers) == 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        os.killpg(proc.pid, sig)
    proc.stdin.write("\n")
    proc.stdin.flush()
    line = wait_for_line(proc, "signals", 60)[-1]
    assert line.split()[1:] == [str(int(s)) for s in sorted((signal.SIGTERM, signal.SIGINT,
                                                             signal.SIGUSR1))]
    if end == "kill -9":
        proc.kill()
    code = proc.wait(timeout=30)                       # no hang at exit
    assert code == (3 if end == "exit" else -signal.SIGKILL), proc.stderr.read()[-2000:]
    assert not wait_until_gone(workers, 5.0), "loader workers outlived the training process"


ABANDON = textwrap.dedent("""
    import os, socket, sys, tempfile, time
    from multiprocessing import resource_sharer
    from pipeline.preemption import quiet_abandoned_handovers
    if sys.argv[1] == "quiet":
        quiet_abandoned_handovers()
    shared = tempfile.TemporaryFile()
    handle = resource_sharer.DupFd(shared.fileno())    # what torch sends for each batch
    client = socket.socket(socket.AF_UNIX)      # the training process, aborted mid-handshake
    client.connect(resource_sharer._resource_sharer._address)
    client.close()
    time.sleep(1.0)                             # the sharer's thread reports (or not) meanwhile
    print("alive")
""")


@pytest.mark.parametrize("hook", ["quiet", "none"])
def test_a_batch_handover_the_training_process_abandoned_prints_no_traceback(tmp_path, hook):
    """The second Ctrl-C can abort the training process while it takes a batch's shared-memory
    handle from a loader worker (CI saw the worker's resource-sharer traceback after the abort
    line). A real resource sharer, a connection dropped mid-handshake: the worker's hook keeps
    it quiet; without the hook (control) multiprocessing prints the traceback."""
    script = tmp_path / "abandon.py"
    script.write_text(ABANDON)
    done = run([sys.executable, script, hook], env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.stdout.strip() == "alive", done.stderr[-2000:]
    if hook == "quiet":
        assert done.stderr == "", done.stderr[-2000:]
    else:
        assert "Traceback" in done.stderr and "resource_sharer" in done.stderr
