"""slurm/pretrain.sbatch on a real Slurm: a one-node cluster on 127.0.0.1 (tests/slurm/setup.sh,
private munged + slurmctld + slurmd under a temporary folder), the demo pretraining under
`srun torchrun` with 2 processes on CPU (gloo). Mid-way through, SIGUSR1 goes to the batch shell
alone (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@120` does before the time limit);
the script forwards it to the training ranks, they stop with one checkpoint, the script requeues
the job, Slurm starts it again (SLURM_RESTART_COUNT=1), it resumes and finishes with weights
bit-identical to an uninterrupted 2-process run.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge; skipped otherwise.
Run with `pytest -m slow tests/test_slurm.py`.
Duration (2-core CPU, Slurm 22.05, measured 2026-12-01): 2 min 37 s and 3 min 21 s in two
runs. In the slower run the demo shards took 27 s, the reference run about 55 s and the job
1 min 42 s. Of the job, the start up to the signal took 36 s, the stop and requeue 10 s, the
wait in the queue 12 s (cred_expire=10, sched_interval=2) and the resumed run 44 s. Starting
the cluster takes about 2 s and stopping it about 6 s.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ONE_THREAD, ROOT, run

SLURM = ROOT / "tests" / "slurm"
SCRIPT = ROOT / "slurm" / "pretrain.sbatch"
RECIPE = ROOT / "recipes" / "demo.yaml"
# 22 steps (2 micro-batches of 16 per process each); checkpoints only at the end or on a signal
RUN = ["pretrain.epochs=2", "pretrain.warmup_epochs=0.5", "pretrain.train_res=32",
       "pretrain.test_res=32", "pretrain.micro_batch=16", "pretrain.loader.num_workers=1",
       "pretrain.eval_every=0", "pretrain.trackers=[]", "pretrain.loader.shuffle_block=64"]
STEPS = 22
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: slurmd starts the jobs and munged runs as root here"
    tools = ["sbatch", "scontrol", "scancel", "squeue", "sinfo", "slurmctld", "slurmd", "munged",
             "mungekey"]
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} not found): apt-get install "
                f"slurmctld slurmd slurm-client munge")
    return None


MISSING = missing()
# skipped before any fixture is built (the session's demo shards take half a minute)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """A running one-node cluster: the environment for its commands (SLURM_CONF, the venv's
    python first on PATH, no SLURM_* variables from an outer job). Always torn down."""
    # munged wants every folder above its socket open to all: not under pytest's 0700 tmp folder
    home = Path(tempfile.mkdtemp(prefix="nfnet-slurm-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(SLURM_CONF=str(home / "slurm.conf"), SLURMCTLD_PORT=str(free_port()),
               SLURMD_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    log = home.parent / f"{home.name}-setup.log"
    try:
        with open(log, "w") as f:
            code = subprocess.run(["bash", SLURM / "setup.sh", home], stdout=f,
                                  stderr=subprocess.STDOUT, env=env, timeout=120).returncode
        assert code == 0, f"tests/slurm/setup.sh failed ({code}):\n{log.read_text()[-5000:]}"
        yield env
    finally:
        subprocess.run(["bash", SLURM / "teardown.sh", home, "--purge"], env=env, timeout=180,
                       capture_output=True)
        log.unlink(missing_ok=True)


def job_info(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    p = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                       text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def steps_logged(keys: Path) -> int:
    """The fewest steps any rank's sample-key log records (0 before both exist)."""
    logs = list(keys.glob("rank*.jsonl"))
    if len(logs) < 2:
        return 0
    counts = []
    for f in logs:
        steps = set()
        for line in f.read_text().splitlines():
            try:
                steps.add(json.loads(line)["step"])
            except json.JSONDecodeError:          # a line being written
                pass
        counts.append(len(steps))
    return min(counts)


def slurm_cmd(env: dict, *cmd, cwd: Path | None = None) -> str:
    """A Slurm command with exactly `env` (conftest.run would add this process's SLURM_*
    variables back); its stdout."""
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr}"
    return p.stdout


def diagnose(env: dict, job: str, output: Path) -> str:
    text = output.read_text() if output.exists() else "(no job output)"
    return f"job {job}: {job_info(env, job)}\n--- job output ---\n{text[-6000:]}"


def weights(out: Path) -> dict:
    return {n: load_file(str(out / "model" / n)) for n in ("model.safetensors", "ema.safetensors")}


def test_usr1_to_the_batch_shell_stops_requeues_and_resumes_bit_identically(
        slurm, demo_shards, tmp_path):
    shards = demo_shards["pretrain"]
    # the uninterrupted 2-process run
    ref = tmp_path / "ref"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         ROOT / "stages" / "pretrain.py", "--recipe", RECIPE, "--shards", shards, "--out", ref,
         *RUN], env=ONE_THREAD, timeout=600)

    out, keys, output = tmp_path / "run", tmp_path / "keys", tmp_path / "job.out"
    env = {**slurm, **ONE_THREAD, "RECIPE": str(RECIPE), "SHARDS": str(shards), "OUT": str(out),
           "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    submitted = slurm_cmd(env, "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0",
                          "--time=00:30:00", f"--output={output}", SCRIPT, *RUN,
                          "--sample-log", keys, cwd=ROOT)      # the job runs in the submit dir
    job = submitted.strip().split(";")[0]

    # 1. mid-way (at least 6 of 22 steps on both ranks), SIGUSR1 to the batch shell alone
    deadline = time.time() + 300
    while steps_logged(keys) < 6:
        state = job_info(slurm, job).get("JobState")
        assert state not in ENDED, diagnose(slurm, job, output)
        assert time.time() < deadline, "the run did not get going\n" + diagnose(slurm, job, output)
        time.sleep(0.1)
    slurm_cmd(slurm, "scancel", "--signal=USR1", "--batch", job)

    # 2. the stop: PREEMPTED.json, then the job ends its first run, is requeued, runs again
    deadline = time.time() + 180
    marker = None
    while marker is None:
        assert time.time() < deadline, "no PREEMPTED.json\n" + diagnose(slurm, job, output)
        try:
            marker = json.loads((out / "PREEMPTED.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    deadline, ended_at, states = time.time() + 600, None, []
    while True:
        info = job_info(slurm, job)
        if not states or states[-1] != info.get("JobState"):
            states.append(info.get("JobState"))
        if info.get("JobState") in ENDED:
            if info.get("Restarts", "0") != "0":
                break                                   # the requeued run has ended
            ended_at = ended_at or time.time()          # ended without a requeue (so far)
            assert time.time() - ended_at < 30, f"no requeue: states {states}\n" + diagnose(
                slurm, job, output)
        else:
            ended_at = None
        assert time.time() < deadline, f"states {states}\n" + diagnose(slurm, job, output)
        time.sleep(0.5)
    print(f"job {job}: states {' -> '.join(states)}")
    text = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"states {states}\n" + diagnose(slurm, job, output))
    assert info["Restarts"] == "1", states

    # the first run: the batch shell forwarded the signal, the ranks stopped once, mid-way
    first, _, second = text.partition("SLURM_RESTART_COUNT=1")
    assert second, "no second run (SLURM_RESTART_COUNT=1) in the job output\n" + text[-6000:]
    assert re.search(r"SIGUSR1: forwarded to 2 training processes", first), first[-6000:]
    stops = [ln for ln in text.splitlines() if ln.startswith("[pretrain] stopped by")]
    assert len(stops) == 1 and stops[0] in first, text[-6000:]
    assert stops[0].startswith(f"[pretrain] stopped by SIGUSR1 after step {marker['step']}: ")
    assert marker["signal"] == "SIGUSR1" and 6 <= marker["step"] < STEPS, marker
    assert "stopped with a complete checkpoint" in first, first[-6000:]
    # the script's line, or Slurm's if the requeue killed the batch shell before it could print
    assert "requeued job" in first or "DUE TO JOB REQUEUE" in first, first[-6000:]
    # the second run: resumed from that checkpoint and finished; the marker is gone
    assert f"[pretrain] resumed from {marker['checkpoint']} at step {marker['step']}" in second
    assert "finished:" in second and "stopped by" not in second, second[-6000:]
    assert not (out / "PREEMPTED.json").exists()

    wa, wb = weights(ref), weights(out)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        worst = max((wa[name][k] - wb[name][k]).abs().max().item() for k in wa[name])
        assert worst == 0.0, f"{name}: max abs difference {worst}"
