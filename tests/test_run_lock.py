"""The output folder's lock (pipeline/run_lock.py) on its own: which holders count as alive. The
stage-level behaviour (a second run exits 2, a lock left by kill -9 does not block the resume,
2 processes hold it once) is tested with real runs in tests/test_preemption.py."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline import run_lock
from pipeline.run_lock import LOCK_NAME, OutLocked, RunLock


def write_lock(out, **holder) -> None:
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-01T00:00:00+00:00",
           "proc_start": run_lock.proc_start(os.getpid()), **holder}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(doc))


def test_a_live_holder_on_this_host_is_refused_and_named(tmp_path):
    write_lock(tmp_path)                                    # this very process
    with pytest.raises(OutLocked, match=rf"host {socket.gethostname()}, pid {os.getpid()}, "
                                        r"started 2026-12-01T00:00:00\+00:00"):
        RunLock.acquire(tmp_path)
    with pytest.raises(OutLocked):                          # provably alive: no override
        RunLock.acquire(tmp_path, break_lock=True)


def test_a_dead_or_reused_pid_on_this_host_is_stale(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid, proc_start=None)
    with RunLock.acquire(tmp_path) as lock:                 # the pid is not running
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.holder.pid == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()              # released
    write_lock(tmp_path, proc_start=12345)                  # this pid, but started at another time
    RunLock.acquire(tmp_path).release()


def test_another_hosts_lock_holds_until_its_heartbeat_is_old_or_broken(tmp_path):
    write_lock(tmp_path, host="node-7", pid=4242)
    with pytest.raises(OutLocked) as e:
        RunLock.acquire(tmp_path)
    assert "host node-7, pid 4242" in str(e.value) and "--break-lock" in str(e.value)
    RunLock.acquire(tmp_path, break_lock=True).release()    # the user's explicit override
    write_lock(tmp_path, host="node-7", pid=4242)
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(tmp_path / LOCK_NAME, (old, old))              # no heartbeat for too long
    RunLock.acquire(tmp_path).release()


def test_the_heartbeat_refreshes_the_lock_and_release_leaves_a_newer_holders_lock(
        tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock.acquire(tmp_path)
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (old, old))
    deadline = time.time() + 10
    while (tmp_path / LOCK_NAME).stat().st_mtime < time.time() - 100 and time.time() < deadline:
        time.sleep(0.02)
    assert (tmp_path / LOCK_NAME).stat().st_mtime > time.time() - 100
    write_lock(tmp_path, host="node-7")                     # someone broke it and took over
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "node-7"
