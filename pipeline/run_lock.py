"""One writer per output folder: `<out>/run.lock`, held by the run that writes there.

A lock file created with O_CREAT | O_EXCL (atomic on local filesystems and on NFS v3+, Lustre,
GPFS), not flock: flock is per host on many shared filesystems, and the run that took a lock on
one node must stop a run started on another. The file names its holder:
    {"host": ..., "pid": ..., "started": "2026-12-02T10:31:07+00:00", "proc_start": <ticks>}
(`proc_start`: the holder's start time in the kernel's clock ticks since boot, to tell a live
holder from a new process that was given the same pid). The holder refreshes the file's mtime
every `HEARTBEAT_S` seconds from a thread, and removes it when it ends in any way Python sees
(finish, stop signal, error, Ctrl-C). A lock left by a killed run (SIGKILL, a crashed node) is
stale:
- on this host, when its pid is not running, or runs a process that started at another time;
- on another host (its processes cannot be seen from here), when its mtime is older than
  `STALE_AFTER_S` (no heartbeat for that long), or when the user passes `--break-lock`.
A stale lock is replaced under a second lock file (`run.lock.break`), so that two runs that
find the same stale lock cannot both take it.
Multi-process runs hold it once: the first process takes it before any process writes.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0                # the holder touches the lock this often
STALE_AFTER_S = 600.0             # another host's lock without a heartbeat for this long is stale


class OutLocked(RuntimeError):
    """The output folder is held by a live run (the message names it and the ways on)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str                  # ISO time the holder took the lock
    proc_start: int | None        # the holder's start time, clock ticks since boot (Linux)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def proc_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])       # field 22; the name may hold spaces


def _me() -> Holder:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Holder(socket.gethostname(), os.getpid(), now, proc_start(os.getpid()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process: alive
        return True
    return True


def _read(path: Path) -> Holder | None:
    """The holder a lock file names; None if it vanished or is unreadable (a torn write)."""
    try:
        doc = json.loads(path.read_text())
        return Holder(str(doc["host"]), int(doc["pid"]), str(doc["started"]), doc.get("proc_start"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(holder: Holder | None, path: Path, break_lock: bool = False) -> str | None:
    """Why the lock at `path` (held by `holder`) is stale, or None when its holder may be alive."""
    if holder is None:
        return "unreadable"
    if holder.host == socket.gethostname():
        if not _alive(holder.pid):
            return f"pid {holder.pid} is not running"
        if holder.proc_start is not None and proc_start(holder.pid) not in (None, holder.proc_start):
            return f"pid {holder.pid} is now another process"
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if age > STALE_AFTER_S:
        return f"no heartbeat from {holder.host} for {age:.0f} s"
    return "--break-lock" if break_lock else None


class RunLock:
    """The lock on one output folder, held by this process (see the module docstring)."""

    def __init__(self, out: Path, holder: Holder):
        self.path, self.holder = Path(out) / LOCK_NAME, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="run-lock")
        self._beat.start()

    @classmethod
    def acquire(cls, out: str | os.PathLike, break_lock: bool = False) -> RunLock:
        """Take the lock on `out` (creating the folder), replacing a stale one; OutLocked when
        a live run holds it."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path, me = out / LOCK_NAME, _me()
        for _ in range(50):
            if _create(path, me):
                return cls(out, me)
            holder = _read(path)
            if holder is None and _younger_than(path, 5.0):    # being written right now
                time.sleep(0.1)
                continue
            reason = stale_reason(holder, path, break_lock)
            if reason is None:
                raise OutLocked(_held_message(out, holder, path))
            _replace_stale(path, holder)
        raise OutLocked(f"{path}: could not take the lock (other runs keep taking it); "
                        f"run one at a time into {out}")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (if it is still ours)."""
        self._stop.set()
        if _read(self.path) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass                   # removed or unreachable: the next acquire decides


def _create(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder.__dict__, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _younger_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except FileNotFoundError:
        return True


def _replace_stale(path: Path, holder: Holder | None) -> None:
    """Remove the stale lock `holder` left, unless another run replaced it meanwhile: checked
    again under `run.lock.break` (itself stale after 30 s, left by a run killed right here)."""
    breaker = path.with_name(path.name + ".break")
    if not _create(breaker, _me()):
        if not _younger_than(breaker, 30.0):
            breaker.unlink(missing_ok=True)
        time.sleep(0.1)
        return
    try:
        if _read(path) == holder:
            path.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


def _held_message(out: Path, holder: Holder | None, path: Path) -> str:
    who = holder.describe() if holder else "an unknown run"
    if holder is not None and holder.host != socket.gethostname():
        return (f"{out} is in use by another run ({who}; {path}). Wait for it to end, or write "
                f"to another --out. If no run is alive there, the lock counts as stale "
                f"{STALE_AFTER_S:.0f} s after its last heartbeat, or pass --break-lock")
    return (f"{out} is in use by another run ({who}; {path}). Wait for it to end, stop it "
            f"(kill {holder.pid if holder else '<pid>'}), or write to another --out")
