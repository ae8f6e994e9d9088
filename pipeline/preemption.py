"""Stopping a run cleanly when the cluster asks: all processes agree on one step boundary.

Schedulers send SIGTERM (SLURM, Kubernetes, spot instances) or SIGUSR1 (SLURM's `--signal`)
seconds to minutes before they kill a job; Ctrl-C sends SIGINT. `RunControl` turns the first such
signal into a request; at every step boundary the processes exchange their requests (and their
counts of unreadable samples) with one small all-reduce, so when the signal reaches only one rank
(SLURM signals the batch step alone) every rank still stops after the same step. The training
loop then writes one complete checkpoint, prints one line and exits with `EXIT_PREEMPTED` (75,
EX_TEMPFAIL: "try again"), which a scheduler can requeue on; `<out>/PREEMPTED.json` says the same
for launchers that replace the exit code (torchrun exits 1 when a worker exits non-zero).

A second SIGINT aborts at once (KeyboardInterrupt; exit 130). The handler itself only records the
signal: a checkpoint being written when it arrives is finished first (writes are atomic anyway).

The exchange: multi-process runs all-reduce a 2-element CPU tensor over a gloo group of their own,
asynchronously and one step behind (the values of step t arrive during step t + 1), so it never
waits on the GPU and costs no host sync in the step; the stop therefore comes one step after the
signal. A single process needs no exchange.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75              # sysexits.h EX_TEMPFAIL
EXIT_ABORTED = 130               # 128 + SIGINT, as a shell reports it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after `step`, with a complete checkpoint at `checkpoint`."""

    def __init__(self, step: int, signame: str, checkpoint: str):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {checkpoint}")
        self.step, self.signame, self.checkpoint = step, signame, checkpoint


_held: list[int] = []        # signals that arrived while the stage was starting up


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[None]:
    """Around a training stage's main(): a stop signal during start-up (building the model,
    reading manifests) no longer kills the process; it is kept, and the run stops at its first
    step boundary with a checkpoint, like any other stop. The previous handlers come back on
    exit (in-process callers, tests)."""
    previous = {sig: signal.signal(sig, _hold) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _held.clear()


def _hold(signum: int, frame) -> None:
    if _held and signum == signal.SIGINT:
        raise KeyboardInterrupt
    if not _held:
        print(f"{signal.Signals(signum).name} received while starting: the run will stop at its "
              f"first step boundary", flush=True)
    _held.append(signum)


class RunControl:
    """Signals in, per-step agreement out (see the module docstring). Use as a context manager
    around the step loop: the handlers are installed on entry and restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.bad_samples = 0                  # this process's unreadable samples so far
        self._previous: dict[int, object] = {}
        self._group = None
        self._pending: tuple[torch.Tensor, object] | None = None

    def __enter__(self) -> RunControl:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _held and self.signum is None:
            self.signum = _held[0]
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pending is not None:       # let the last exchange finish before the group goes
            self._pending[1].wait()
            self._pending = None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt        # the second Ctrl-C: abort now
        if self.signum is None:
            self.signum = signum
            print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] "
                  f"{signal.Signals(signum).name} received: stopping at the next step boundary "
                  f"(Ctrl-C again aborts at once)", flush=True)

    @property
    def signame(self) -> str:
        """The signal this process received, or what reached another one."""
        return (signal.Signals(self.signum).name if self.signum is not None
                else "a signal to another process")

    def exchange(self) -> tuple[bool, int]:
        """(stop, total unreadable samples): the same on every process. Call once per step
        boundary on every process. One step behind with several processes."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.signum is not None, self.bad_samples
        mine = torch.tensor([1 if self.signum is not None else 0, self.bad_samples],
                            dtype=torch.long)
        if self._group is None:
            # a gloo group of its own (made at the first boundary, by every process at once):
            # the exchange stays on the CPU whatever the training backend
            self._group = dist.new_group(backend="gloo")
        agreed = (False, 0)
        if self._pending is not None:
            values, work = self._pending
            work.wait()
            agreed = (bool(values[0] > 0), int(values[1]))
        work = dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        self._pending = (mine, work)
        return agreed


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: Ctrl-C (sent to the whole process group) and SLURM's SIGUSR1 (sent
    to every process of a job step without `B:`) are left to the training process, so that the
    loader survives until the step boundary. SIGTERM still ends a worker: the interpreter's exit
    terminates leftover workers with it (and would wait forever for one that ignored it); the
    launchers (torchrun, Kubernetes, SLURM's `--signal=B:...` forwarded by slurm/pretrain.sbatch)
    deliver it to the training processes, not to their loader workers."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
