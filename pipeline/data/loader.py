"""From datasets to the training step: the DataLoader, the loader's findings handled in the
training process, and evaluation's reading of every sample once.

    make_loader      a DataLoader that passes each fetch through (not accelerate's: the data is
                     split by rank already)
    micro_batches    one fetch from each loader worker makes a rank's micro-batch
    checked          a LoaderFailure becomes DataError; replaced samples and notes are reported
    Waited           the seconds the step waited for its batches (data_wait_share)
    BadSampleLog     replaced samples said per shard, counted
    EvalShards       every sample of a split exactly once, for evaluation and validation
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.batch import PREFETCH, BadSample, Batch, Encoded, LoaderFailure
from pipeline.data.manifest import SplitInfo
from pipeline.data.samples import decode_sample
from pipeline.data.shard_reader import DataError, PositionReader
from pipeline.preemption import ignore_stop_signals


class EvalShards(IterableDataset):
    """Every sample of a split exactly once: contiguous position ranges per rank and worker, in
    shard order, the last batch of each worker possibly short. No padding, no duplicates.
    `transform`: PIL image -> uint8 (3, S, S) (transforms.eval_transform)."""

    def __init__(self, split: SplitInfo, transform: Callable, *, rank: int, world: int,
                 workers: int, batch: int):
        self.split, self.transform = split, transform
        self.rank, self.world, self.workers, self.batch = rank, world, max(1, workers), batch

    def positions(self, worker: int) -> tuple[int, int]:
        n, parts = self.split.num_samples, self.world * self.workers
        part = self.rank * self.workers + worker
        return part * n // parts, (part + 1) * n // parts

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        lo, hi = self.positions(info.id if info is not None else 0)
        reader = PositionReader(self.split, np.arange(len(self.split.urls)))
        for a in range(lo, hi, self.batch):
            raws = reader.read(a, min(a + self.batch, hi))
            images, labels = zip(*(decode_sample(r) for r in raws))
            chw = torch.stack([torch.as_tensor(self.transform(i)) for i in images])
            yield Batch.unmixed(chw.permute(0, 2, 3, 1).contiguous(), torch.tensor(labels),
                                [r["__key__"] for r in raws], torch.arange(a, a + len(raws)))


_frozen = False


def make_loader(dataset: IterableDataset, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that passes the dataset's batches through. Not given to accelerate.prepare:
    that would re-split (or broadcast) data we have already split by rank.

    The process about to fork the workers freezes its objects out of the garbage collector's
    reach first (Python's advice for a fork: the children inherit them frozen, and their
    collections touch no inherited page). The training process holds millions of long-lived
    objects (torch, timm, the model); unfrozen, each full collection walks them all, which took
    40% of its loader time and 10% of an in-process loader's (perf, F0 at 192 px). Once per
    process: objects frozen are never collected, so later loaders (validation) freeze nothing
    more."""
    global _frozen
    if workers > 0 and not _frozen:      # once: what is frozen is never collected
        gc.freeze()
        _frozen = True
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=PREFETCH if workers > 0 else None,
                      worker_init_fn=worker_init if workers > 0 else None)


def worker_init(worker_id: int) -> None:
    """A loader worker's start: the stop signals left to the training process (preemption.py);
    what it inherited stays frozen out of the garbage collector's reach (see make_loader)."""
    ignore_stop_signals(worker_id)
    gc.freeze()


def checked(batches: Iterator[Batch | LoaderFailure], on_bad: Callable[[BadSample], None],
            on_note: Callable[[str], None] = print) -> Iterator[Batch]:
    """The micro-batches, with the loader's findings handled in the training process: a
    LoaderFailure raises DataError (one line, no worker traceback); each replaced sample goes to
    `on_bad`, each note (a shard that differs from the manifest, loader.bad_samples: skip) to
    `on_note`."""
    for batch in batches:
        if isinstance(batch, LoaderFailure):
            raise DataError(batch.message)
        for record in batch.bad:
            on_bad(record)
        for note in batch.notes:
            on_note(note)
        yield batch


class BadSampleLog:
    """The samples this process's loader replaced (`loader.bad_samples: skip`), said per shard:
    one line when a shard's first one arrives (its key and why), and at the end one line per
    shard with its count and a total (`summary`), not a line per sample."""

    def __init__(self, say: Callable[[str], None], prefix: str):
        self.say, self.prefix = say, prefix
        self.records: list[BadSample] = []
        self.per_shard: dict[str, list[BadSample]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: BadSample, policy: str) -> None:
        self.records.append(record)
        seen = self.per_shard.setdefault(record.url, [])
        seen.append(record)
        if len(seen) == 1:
            self.say(f"{self.prefix}shard {record.url}: unreadable sample {record.key}: "
                     f"{record.reason}; replaced by {record.replaced_by} ({policy}; the shard's "
                     f"count follows at the end)")

    def summary(self) -> list[str]:
        """One line per shard and a total; nothing when every sample was read."""
        if not self.records:
            return []
        lines = [f"{self.prefix}shard {url}: {len(recs)} sample(s) replaced, the first "
                 f"{recs[0].key}: {recs[0].reason}" for url, recs in self.per_shard.items()]
        return lines + [f"{self.prefix}{len(self.records)} unreadable sample(s) replaced in "
                        f"{len(self.per_shard)} shard(s)"]


class Waited:
    """An iterator of batches that keeps the seconds its consumer spent waiting for them: the
    training step's time blocked on data (`data_wait_share` in metrics.json)."""

    def __init__(self, batches: Iterator[Batch]):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> Waited:
        return self

    def __next__(self) -> Batch:
        t = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - t

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


def micro_batches(loader: DataLoader, fetches: int) -> Iterator[Batch | Encoded | LoaderFailure]:
    """Concatenate `fetches` consecutive loader batches (one per worker) into a micro-batch."""
    it = iter(loader)
    while True:
        parts = [next(it) for _ in range(fetches)]
        failed = [p for p in parts if isinstance(p, LoaderFailure)]
        yield failed[0] if failed else type(parts[0]).concat(parts)
