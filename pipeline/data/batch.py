"""The one batch type: what the loader hands the training step and evaluation, whatever the path.

A `Batch` holds n examples as uint8 HWC images (what PIL and nvJPEG produce; the step makes the
NCHW float input from them on the device: `normalize`), both labels of every example, the weight of
the first, and what the loader saw on the way: the keys and positions of the samples it read (two
per example with DeepMind's disjoint pairs), the samples it had to replace and its notes. An
unmixed example has labels_b == labels and ratio 1.

`Encoded` is the device path's half-way form (`loader.decode: device`): the loader workers pass the
JPEG bytes and every random draw, and pipeline/data/examples.py turns them into a `Batch` on the
device. The training step only ever sees a `Batch`.

A loader worker that meets unusable data (a shard changed since sharding) yields a `LoaderFailure`
instead, so the training process can stop with one clear line rather than a worker traceback;
`pipeline.data.loader.checked` turns it into DataError before the step.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info


class BadSample(NamedTuple):
    """A sample the loader could not read, and the one used in its place."""
    key: str
    url: str
    reason: str
    replaced_by: str


@dataclass
class Batch:
    images: torch.Tensor            # uint8 (n, H, W, 3)
    labels: torch.Tensor            # int64 (n,): the label of each example's image a
    labels_b: torch.Tensor          # int64 (n,): its partner's label (== labels when unmixed)
    ratio: torch.Tensor             # float32 (n,): the weight of `labels` (1 when unmixed)
    keys: list[str]                 # the samples read, in reading order
    index: torch.Tensor             # int64: their positions (epoch x N + order index in training)
    bad: list[BadSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def unmixed(cls, images: torch.Tensor, labels: torch.Tensor, keys: list[str],
                index: torch.Tensor, **kw: Any) -> Batch:
        return cls(images, labels, labels, torch.ones(len(labels)), keys, index, **kw)

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        """One micro-batch from the fetches of a rank's loader workers (in worker order)."""
        if len(parts) == 1:
            return parts[0]
        return Batch(*(torch.cat([getattr(p, f) for p in parts])
                       for f in ("images", "labels", "labels_b", "ratio")),
                     [k for p in parts for k in p.keys], torch.cat([p.index for p in parts]),
                     [b for p in parts for b in p.bad], [n for p in parts for n in p.notes])

    def __reduce__(self):
        """How a batch leaves a loader worker: its small tensors by value, its images by
        reference to the shared memory the worker wrote them in (a ring of buffers it reuses:
        batch_buffer), copied out on arrival (`_arrived`). A fresh shared-memory segment
        per fetch cost the worker 6 ms of page faults per 32 examples on the dev VM (4% of the CPU
        path); small tensors through shared memory, 3.5 ms more."""
        return (_arrived, (self.images, self.labels.numpy(), self.labels_b.numpy(),
                           self.ratio.numpy(), self.keys, self.index.numpy(), self.bad, self.notes))

    def pin_memory(self) -> Batch:
        """Page-locked host tensors (the DataLoader calls this with pin_memory=True)."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(),
                     self.labels_b.pin_memory(), self.ratio.pin_memory(), self.keys,
                     self.index, self.bad, self.notes)

    def to(self, device: torch.device) -> Batch:
        """The tensors on `device` (non-blocking copies)."""
        return Batch(*(getattr(self, f).to(device, non_blocking=True)
                       for f in ("images", "labels", "labels_b", "ratio")),
                     self.keys, self.index, self.bad, self.notes)


_MAPPED: collections.deque = collections.deque(maxlen=64)   # the workers' buffers, kept mapped


def _arrived(images: torch.Tensor, labels: np.ndarray, labels_b: np.ndarray, ratio: np.ndarray,
             keys: list[str], index: np.ndarray, bad: list[BadSample], notes: list[str]) -> Batch:
    """A batch from a loader worker, unpickled in the training process (as it arrives, before the
    worker may reuse its buffer: the DataLoader asks a worker for a fetch only after taking one,
    and the ring holds more buffers than fetches in flight). The images are copied out; the
    worker's buffer stays mapped here, so the next fetch in it maps nothing anew."""
    if images.numel() and images.is_shared():
        _MAPPED.append(images.untyped_storage())
        own = np.empty(tuple(images.shape), np.uint8)       # malloc'd: reused, no page faults
        own[...] = images.numpy()
        images = torch.from_numpy(own)
    return Batch(images, torch.from_numpy(labels), torch.from_numpy(labels_b),
                 torch.from_numpy(ratio), keys, torch.from_numpy(index), bad, notes)


@dataclass
class Encoded:
    """A fetch on its way to the device: the JPEG bytes of its samples (one uint8 tensor and
    offsets: one shared-memory transfer), every random draw, and the batch's other fields."""
    jpeg: torch.Tensor              # uint8: the JPEG files end to end
    offsets: torch.Tensor           # int64 (k + 1,): file i is jpeg[offsets[i]:offsets[i + 1]]
    draws: Any                      # examples.Draws: crops, flips, pairs, mixing, RandAugment
    batch: Batch                    # labels, ratio, keys, positions, bad samples, notes; images
                                    # empty until the device makes them

    @staticmethod
    def concat(parts: list[Encoded]) -> Encoded:
        if len(parts) == 1:
            return parts[0]
        shifts = torch.tensor([0] + [int(p.offsets[-1]) for p in parts[:-1]]).cumsum(0)
        offsets = torch.cat([parts[0].offsets[:1]] +
                            [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        images = [int(len(p.offsets) - 1) for p in parts]
        draws = type(parts[0].draws).concat([p.draws for p in parts], images)
        return Encoded(torch.cat([p.jpeg for p in parts]), offsets, draws,
                       Batch.concat([p.batch for p in parts]))

    def pin_memory(self) -> Encoded:
        return Encoded(self.jpeg.pin_memory(), self.offsets, self.draws, self.batch)


PREFETCH = 4        # fetches a loader worker has in flight (loader.make_loader's prefetch_factor)
RING = PREFETCH + 2  # shared buffers per shape in a loader worker: more than the fetches in flight
_RINGS: dict[tuple[int, ...], list] = {}


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """Where a fetch's examples are written: in a loader worker, the next of RING shared-memory
    buffers it reuses (the training process copies each batch out as it arrives, batch._arrived,
    and asks the worker for its next fetch only after that; with at most PREFETCH fetches in
    flight, a buffer comes round again only after its batch was copied out), so no fetch pays for
    a fresh shared segment; in the training process itself (no workers), a new tensor."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    ring = _RINGS.setdefault(shape, [0])
    if len(ring) < RING + 1:
        ring.append(torch.empty(shape, dtype=torch.uint8).share_memory_())
    ring[0] = ring[0] % RING + 1
    return ring[ring[0]]


@dataclass
class LoaderFailure:
    """What a loader worker yields when the data cannot be used; raised as DataError by the
    training process."""
    message: str


def pack_jpegs(files: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Many JPEG files as one uint8 tensor + offsets."""
    sizes = [len(f) for f in files]
    offsets = torch.zeros(len(files) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(sizes, dtype=torch.long).cumsum(0)
    buf = (torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8) if files
           else torch.empty(0, dtype=torch.uint8))
    return buf, offsets
