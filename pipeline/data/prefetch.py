"""The device data path off the step's critical path: the next micro-batches' examples are made
on the device (decode, crop, flip, mix, RandAugment: pipeline/data/examples.py, `build_device`)
while the current step runs (`loader.decode: device`).

`DevicePrefetcher(items, recipe, device)` takes the iterator of encoded micro-batches the loader
yields (JPEG bytes and every random draw: `batch.Encoded`; loader.micro_batches) and yields the
`Batch` of each, in the same order, its images on the device. A `LoaderFailure` passes through
(the training process raises it).

How (CUDA): a background thread pulls raw batches and prepares them on its own CUDA stream,
`lookahead` micro-batches ahead (default 2); the first raw batch is read in the constructor, so
the DataLoader forks its workers from the calling thread. A thread, not only a stream, because
nvJPEG's batched decode blocks its calling thread until the decode ends (torchvision synchronises
its decode stream) and the parameter draws are Python: on the training thread both would hold back
the launch of the next step's kernels. Synchronisation: after a batch's work the thread records an
event on its stream; the consumer makes its current stream wait for that event before it uses the
images (the GPU waits, the host does not), and marks the images as used on its stream
(`record_stream`), so the caching allocator does not hand their memory back to the side stream
while the step still reads it. CPU: prepared synchronously in `__next__` (lookahead 0): there is
no second device to overlap with, and the 2-core CI machines gain nothing from a thread; a thread
can still be asked for (the tests do, to check it yields the same batches).

Determinism and resume: the thread reads the same iterator in the same order and draws every
random parameter from the samples' own seeds, so the batches are identical with and without
prefetching. It only looks ahead in the stream the step consumes anyway; a checkpoint's data
cursor is computed from the optimiser steps taken (pipeline/train.py, Trainer.save_checkpoint:
steps x accumulation x sub-batch x images per example), not from what was read or prefetched,
so batches prefetched but not yet trained on are read again after a resume.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Iterator

import torch

from pipeline.data.batch import Batch, Encoded, LoaderFailure
from pipeline.data.examples import ExampleRecipe, build_device

_END = object()


def prepare(item: Encoded | LoaderFailure, recipe: ExampleRecipe, device: torch.device
            ) -> Batch | LoaderFailure:
    """One encoded micro-batch -> its Batch, made on `device`; a LoaderFailure as it is."""
    if isinstance(item, LoaderFailure):
        return item
    return build_device(recipe, item, device)


class DevicePrefetcher:
    """Iterator of prepared micro-batches (see the module docstring). `lookahead`: micro-batches
    prepared ahead by a background thread (0: prepared in `__next__`; default 2 on CUDA, 0 else).
    `close()` (or the end of a `with` block, or garbage collection) stops the thread."""

    def __init__(self, batches: Iterator[Encoded | LoaderFailure], recipe: ExampleRecipe,
                 device: torch.device, lookahead: int | None = None):
        self.batches, self.recipe = batches, recipe
        self.device = torch.device(device)
        self.lookahead = (2 if self.device.type == "cuda" else 0) if lookahead is None else lookahead
        self._thread: threading.Thread | None = None
        self._closed = False
        if self.lookahead > 0:
            # the first raw batch is read here: a DataLoader forks its worker processes on its
            # first read, and forking is safe from this thread, before the prefetch thread exists
            first = next(batches, _END)
            source = iter(()) if first is _END else itertools.chain([first], batches)
            self._queue: queue.Queue = queue.Queue(maxsize=self.lookahead)
            self._stop = threading.Event()
            # the thread holds no reference to self: dropping the prefetcher stops it (__del__)
            self._thread = threading.Thread(
                target=_work, args=(source, recipe, self.device, self._queue, self._stop),
                name="device-prefetch", daemon=True)
            self._thread.start()

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Batch | LoaderFailure:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            return prepare(next(self.batches), self.recipe, self.device)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)                        # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item                                   # the thread's error, as it was raised
        batch, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)                     # the GPU waits for the side stream
            batch.images.record_stream(stream)           # memory stays ours until the step is done
        return batch

    def close(self) -> None:
        """Stop the thread (it finishes the batch in hand; prepared batches are dropped), then
        close the source iterator (a generator over the DataLoader: its workers stop)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._stop.set()
            with contextlib.suppress(queue.Empty):
                while True:                              # unblock a waiting put
                    self._queue.get_nowait()
            thread.join(timeout=10)
            if thread.is_alive():                        # still inside the source: leave it be
                return
        close_source = getattr(self.batches, "close", None)
        if close_source is not None:
            close_source()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _work(batches: Iterator[Encoded | LoaderFailure], recipe: ExampleRecipe,
          device: torch.device, out: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: prepare batches on a side stream, queue (batch, its event)."""
    try:
        with _side_stream(device) as stream, torch.no_grad():
            for raw in batches:
                batch = prepare(raw, recipe, device)
                event = None
                if stream is not None and isinstance(batch, Batch):
                    event = torch.cuda.Event()
                    event.record(stream)
                if not _put(out, (batch, event), stop):
                    return
        _put(out, _END, stop)
    except BaseException as e:                           # raised again in the consumer
        _put(out, e, stop)


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """The calling thread's own CUDA stream on the training device (None on the CPU)."""
    if device.type != "cuda":
        yield None
        return
    torch.cuda.set_device(device)                        # per thread: DDP ranks use cuda:k
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield stream


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Queue an item, waiting for room; False once the prefetcher is closed."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
