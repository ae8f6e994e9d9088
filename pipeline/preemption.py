"""Stopping a run cleanly when the cluster asks: all processes agree on one step boundary.

Schedulers send SIGTERM (Slurm, Kubernetes, spot instances, `timeout`, systemd) or SIGUSR1
(Slurm's `--signal`) seconds to minutes before they kill a job; Ctrl-C sends SIGINT. A stop
signal can reach the training process alone, its whole process group (Ctrl-C, `kill -- -PGID`,
`scancel` without `--batch`), or come through `torchrun`, which forwards it with `os.killpg` to
each rank's group: the DataLoader workers get it too. The first stop signal becomes a request;
at every step boundary the processes exchange their requests (the signal numbers, so that every
rank can name the signal) and their counts of unreadable samples with one small all-reduce, so
when the signal reaches only one rank (Slurm signals the batch step alone) every rank still stops
after the same step. The training loop then writes one complete checkpoint, prints one line and
exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), which a scheduler can requeue on;
`<out>/PREEMPTED.json` says the same for launchers that replace the exit code (torchrun exits 1
when a worker exits non-zero).

A second SIGINT aborts at once with `EXIT_ABORTED` (130), whenever it comes: during start-up, in
a step, while the stop checkpoint is written or after it. The handlers only record the signal;
the abort is a KeyboardInterrupt while the stage's main() runs (so a checkpoint being written is
removed, not left half-written, and the loader workers are shut down), and an immediate exit
once main() has returned (`stage_exit`). Repeated SIGTERM / SIGUSR1 change nothing.

The exchange: multi-process runs all-reduce a 4-element CPU tensor over a gloo group of their
own, asynchronously and one step behind (the values of step t arrive during step t + 1), so it
never waits on the GPU and costs no host sync in the step; the stop therefore comes one step
after the signal. A single process needs no exchange.

DataLoader workers (`ignore_stop_signals`, their worker_init_fn) survive the stop signals that
reach them beside the training process, and still end with it: see that function.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_sharer
from typing import NoReturn

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75              # sysexits.h EX_TEMPFAIL
EXIT_ABORTED = 130               # 128 + SIGINT, as a shell reports it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)   # also the order of precedence


class Preempted(Exception):
    """The run stopped on a signal after `step`, with a complete checkpoint at `checkpoint`."""

    def __init__(self, step: int, signame: str, checkpoint: str):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {checkpoint}")
        self.step, self.signame, self.checkpoint = step, signame, checkpoint


class _Stop:
    """This process's stop state: one per process, like the signal handlers themselves."""
    signum: int | None = None          # the first stop signal received
    depth = 0                          # nesting of hold_stop_signals (handlers installed at 1)
    previous: dict[int, object] = {}
    script = False                     # run by stage_exit: handlers stay until the process ends
    main_returned = False              # stage_exit: main() is done, only the exit is left


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _on_signal(signum: int, frame) -> None:
    if _Stop.signum is None:
        _Stop.signum = signum
        # to the file descriptor: a print() here could re-enter a print the signal interrupted
        os.write(1, f"[rank {_rank()}] {signal.Signals(signum).name} received: stopping at the "
                    f"next step boundary with a checkpoint (Ctrl-C again aborts at once)\n".encode())
        return
    if signum != signal.SIGINT:
        return                             # a repeated SIGTERM / SIGUSR1 changes nothing
    if _Stop.main_returned:                # nothing is left to clean up: exit now
        say_aborted()
        os._exit(EXIT_ABORTED)
    raise KeyboardInterrupt                # the second Ctrl-C: abort (train_cli / stage_exit: 130)


def say_aborted(where: str = "") -> None:
    """The one line of an abort by a second Ctrl-C (from the first process only). Written to the
    file descriptor: this may run inside a signal handler, while Python is writing to stderr."""
    if _rank() == "0":
        os.write(2, f"error: aborted by a second Ctrl-C; the newest complete checkpoint"
                    f"{' under ' + where if where else ''} is intact\n".encode())


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[None]:
    """Around a training stage's main() (and, nested, around the step loop): a stop signal from
    here on is recorded, not fatal, and the run stops at its next step boundary with a
    checkpoint; one during start-up (building the model, reading manifests) waits for the first
    boundary. A second Ctrl-C that ends up here exits 130 with one line. The previous handlers
    come back when the outermost one exits (in-process callers, tests), except under
    `stage_exit`, where they stay until the process ends."""
    if _Stop.depth == 0:
        _Stop.previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    _Stop.depth += 1
    try:
        yield
    except KeyboardInterrupt:
        if _Stop.signum is None or _Stop.depth > 1:   # not ours, or an outer one decides
            raise
        say_aborted()
        raise SystemExit(EXIT_ABORTED) from None
    finally:
        _Stop.depth -= 1
        if _Stop.depth == 0 and not _Stop.script:
            for sig, handler in _Stop.previous.items():
                signal.signal(sig, handler)
            _Stop.previous, _Stop.signum = {}, None


def stage_exit(main: Callable[[], int | None]) -> NoReturn:
    """`if __name__ == "__main__": stage_exit(main)` for the training stages: exit with main()'s
    code. The stop-signal handlers stay installed to the end of the process, so that a second
    Ctrl-C after main() returned (while the interpreter shuts down) still exits 130."""
    _Stop.script = True
    code: int | str | None = 1
    try:
        try:
            code = main()
        except SystemExit as e:
            code = e.code
        _Stop.main_returned = True
    except KeyboardInterrupt:                  # a second Ctrl-C in main()'s last instants
        say_aborted()
        code = EXIT_ABORTED
    sys.exit(code)


class RunControl:
    """Signals in, per-step agreement out (see the module docstring). Use as a context manager
    around the step loop: it holds the stop signals (hold_stop_signals) while it is open."""

    def __init__(self) -> None:
        self.bad_samples = 0                  # this process's unreadable samples so far
        self.agreed: int | None = None        # the stop signal all processes agreed on
        self._hold: contextlib.AbstractContextManager | None = None
        self._group = None
        self._pending: tuple[torch.Tensor, object] | None = None

    def __enter__(self) -> RunControl:
        self._hold = hold_stop_signals()
        self._hold.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._pending is not None:       # the last exchange finishes before the group goes
                self._pending[1].wait()
                self._pending = None
        finally:
            hold, self._hold = self._hold, None
            if hold is not None:
                hold.__exit__(*exc)

    @property
    def signum(self) -> int | None:
        """The stop signal this process received, if any."""
        return _Stop.signum

    @property
    def signame(self) -> str:
        """The signal that stops the run: this process's, or the one that reached another."""
        signum = self.agreed if self.agreed is not None else _Stop.signum
        return signal.Signals(signum).name if signum is not None else "no signal"

    def exchange(self) -> tuple[bool, int]:
        """(stop, total unreadable samples): the same on every process, with `agreed` the
        signal that stops the run. Call once per step boundary on every process. One step
        behind with several processes."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            self.agreed = _Stop.signum
            return self.agreed is not None, self.bad_samples
        # one count per stop signal (every rank learns which signal it was), then the bad samples
        mine = torch.tensor([int(_Stop.signum == s) for s in STOP_SIGNALS] + [self.bad_samples],
                            dtype=torch.long)
        if self._group is None:
            # a gloo group of its own (made at the first boundary, by every process at once):
            # the exchange stays on the CPU whatever the training backend
            self._group = dist.new_group(backend="gloo")
        agreed: tuple[bool, int] = (False, 0)
        if self._pending is not None:
            values, work = self._pending
            work.wait()
            counts = values.tolist()
            self.agreed = next((s for s, n in zip(STOP_SIGNALS, counts) if n > 0), None)
            agreed = (self.agreed is not None, int(counts[-1]))
        work = dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        self._pending = (mine, work)
        return agreed


# ------------------------------------------------------------------------------------------------
# DataLoader workers
# ------------------------------------------------------------------------------------------------

def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: the worker survives the stop signals that reach it beside the
    training process (a process group's Ctrl-C or SIGTERM, torchrun's forwarding, Slurm's
    SIGUSR1 to every process of a step), so that the loader still delivers up to the step
    boundary where the training process stops; and it ends with the training process:

    - SIGINT and SIGUSR1 are ignored;
    - SIGTERM ends the worker only when its parent sent it (the DataLoader's shutdown and the
      interpreter's exit terminate leftover workers that way, as torch's own worker handler
      tells them apart); on Linux a thread reads SIGTERM with its sender (sigwaitinfo), where
      that is not available SIGTERM keeps torch's handling (it ends the worker);
    - the worker exits when its parent is gone: the kernel kills it (PR_SET_PDEATHSIG, Linux;
      the parent is the thread that first iterates the loader, the training thread), elsewhere
      a thread polls the parent pid every second.
    - a batch the training process abandons half-received (a second Ctrl-C aborts it in the
      middle of taking a batch's shared-memory handle from the worker) is not reported as a
      traceback from the worker: `quiet_abandoned_handovers`.
    The blocked SIGTERM and the ignored signals are inherited by programs a worker starts
    (`pipe:` shard URLs); they end when the worker closes their pipe."""
    parent = os.getppid()
    quiet_abandoned_handovers()
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # inherited by later threads
        threading.Thread(target=_sigterm_from_parent_only, args=(parent,), daemon=True,
                         name="sigterm-from-parent").start()
    _exit_with_parent(parent)


# where multiprocessing's resource sharer reports the errors (a private name: None if it moves)
_SHARER_LOOP = getattr(getattr(getattr(resource_sharer, "_ResourceSharer", None), "_serve", None),
                       "__code__", None)


def quiet_abandoned_handovers() -> None:
    """In a loader worker: a handover of shared memory that the training process abandoned is
    not printed as a traceback. A worker hands each batch's shared-memory file descriptor over
    through multiprocessing's resource sharer (torch's file_descriptor strategy): a thread that
    accepts one connection per batch from the training process. When a second Ctrl-C aborts the
    training process in the middle of that exchange, the thread's accept() fails (EOFError, a
    reset connection) and multiprocessing prints the traceback through `sys.excepthook` (its
    `_serve` loop catches everything and reports it that way). Such an error means only that
    the receiver is gone: the batch was never used. Every other exception still reaches the
    previous hook, and none of the worker's own errors go through this hook (torch's worker loop
    catches them and re-raises them in the training process)."""
    previous = sys.excepthook

    def hook(kind, value, tb) -> None:
        abandoned = (issubclass(kind, (EOFError, OSError, multiprocessing.AuthenticationError))
                     and tb is not None and _SHARER_LOOP is not None
                     and tb.tb_frame.f_code is _SHARER_LOOP)
        if not abandoned:
            previous(kind, value, tb)

    sys.excepthook = hook


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)                 # as torch's handler does: 0 keeps the loader from raising


def _exit_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the prctl took effect
                os._exit(0)
            return
    threading.Thread(target=_poll_parent, args=(parent,), daemon=True, name="parent-poll").start()


def _poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
