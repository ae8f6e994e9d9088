"""Reading shards for training: every sample once per epoch, equal work per rank, exact resume.

webdataset's own pipeline splits shards by node before shuffling and has no mid-epoch resume, so
the order is defined here and webdataset only reads the tars.

The epoch order. For epoch e the shards are permuted with a seed shared by all ranks; that gives a
"position" for every sample. Positions are cut into blocks of `shuffle_block` samples and each
block is permuted (seeded by epoch and block), which gives the epoch *order*: a list of positions.
The order is cut into S streams of L = N // S samples (the last N - S*L < S samples of the order are
not used this epoch; a different few each epoch, since the shard order changes).

Streams and batches. Stream s reads its piece of the order sequentially (only the blocks it owns,
so no tar is read twice), and continues into the next epoch's piece when it ends. Each micro-step
takes one sub-batch of `sub_batch` samples from *every* stream: the global micro-batch is the
union of the streams' sub-batches, whichever rank or dataloader worker reads each stream. A rank
owns S / world streams, a worker S / (world * workers) of them; a rank's micro-batch is one fetch
from each of its workers. So:
- each rank gets the same number of batches (streams are endless and in lockstep);
- 1 process x batch 2b (2 workers) and 2 processes x batch b (1 worker) see the same global
  batches when S is the same, so their weights agree (tests/test_distributed.py);
- a cursor (epoch, samples consumed per stream) resumes the exact sequence when S is unchanged,
  whatever the number of processes. When S changes, the unseen rest of the epoch is pooled and
  re-split over the new streams: no sample is repeated or skipped (beyond fewer than S of the
  remainder), then epochs continue with the new layout.
Augmentation randomness is seeded per sample from (seed, epoch, order index), so an image is
transformed identically whichever worker reads it, before or after a resume.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import examples
from pipeline.data.batch import BadSample, Batch, Encoded, LoaderFailure, pack_jpegs
from pipeline.data.examples import ExampleRecipe, SampleInfo
from pipeline.data.manifest import SplitInfo
from pipeline.data.samples import open_sample, problem_of
from pipeline.data.shard_reader import DataError, PositionReader

# ------------------------------------------------------------------------------------------------
# The epoch order
# ------------------------------------------------------------------------------------------------

def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)


def block_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, block, 0xB10C]).permutation(size)


_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-sample augmentation seed (31 bits): independent of which worker or rank reads the
    sample. SplitMix64's mixing of the three numbers: 1 us, where a numpy SeedSequence took 24
    (0.8% of a CPU loader's time at two images per example)."""
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xD1B54A32D192ED03
         + (index + 1) * 0xAF251AF3B0F025B5) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) >> 33


def iter_order(split: SplitInfo, seed: int, epoch: int, block: int,
               segments: list[tuple[int, int]], strict: bool = True) -> Iterator[tuple[int, dict]]:
    """(order index, raw sample) for the order ranges `segments` of `epoch`, in order."""
    n = split.num_samples
    reader = PositionReader(split, shard_order(len(split.urls), seed, epoch), strict)
    for a, b in segments:
        q = a
        while q < b:
            k = q // block
            lo, hi = k * block, min(k * block + block, n)
            raw = reader.read(lo, hi)
            perm = block_permutation(seed, epoch, k, hi - lo)
            for j in range(q - lo, min(b, hi) - lo):
                yield lo + j, raw[perm[j]]
            q = min(b, hi)


# ------------------------------------------------------------------------------------------------
# Streams and the cursor
# ------------------------------------------------------------------------------------------------

@dataclass
class Cursor:
    """Where every stream is: `offset` samples into its piece of `epoch`'s order.

    `segments` (per stream, for `epoch` only) is set after an elastic re-split; otherwise stream s
    owns order range [s * L, (s + 1) * L) with L = num_samples // num_streams.
    """
    epoch: int = 0
    offset: int = 0
    num_streams: int = 0
    segments: list[list[tuple[int, int]]] | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Cursor:
        segs = state.get("segments")
        if segs is not None:
            segs = [[(int(a), int(b)) for a, b in s] for s in segs]
        return cls(int(state["epoch"]), int(state["offset"]), int(state["num_streams"]), segs)


def stream_segments(num_samples: int, num_streams: int, stream: int) -> list[tuple[int, int]]:
    length = num_samples // num_streams
    return [(stream * length, (stream + 1) * length)]


def _segment_len(segs: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in segs)


def _drop_prefix(segs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out = []
    for a, b in segs:
        take = min(n, b - a)
        n -= take
        if a + take < b:
            out.append((a + take, b))
    return out


def rescale_cursor(cursor: Cursor, num_samples: int, num_streams: int) -> Cursor:
    """Re-split the rest of the cursor's epoch over `num_streams` streams (elastic resume)."""
    if cursor.num_streams == num_streams:
        return cursor
    old = cursor.segments or [stream_segments(num_samples, cursor.num_streams, s)
                              for s in range(cursor.num_streams)]
    rest = [seg for s in old for seg in _drop_prefix(s, cursor.offset)]
    each = _segment_len(rest) // num_streams
    new, pos = [], 0
    for _ in range(num_streams):                  # cut the pooled rest into equal pieces
        new.append(_drop_prefix(_take_prefix(rest, pos + each), pos))
        pos += each
    return Cursor(cursor.epoch, 0, num_streams, new)


def _take_prefix(segs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out = []
    for a, b in segs:
        if n <= 0:
            break
        take = min(n, b - a)
        out.append((a, a + take))
        n -= take
    return out


def advance(cursor: Cursor, num_samples: int, samples: int) -> Cursor:
    """The cursor after every stream has consumed `samples` more samples."""
    epoch, offset, segments = cursor.epoch, cursor.offset + samples, cursor.segments
    while True:
        length = (_segment_len(segments[0]) if segments is not None
                  else num_samples // cursor.num_streams)
        if offset < length:
            return Cursor(epoch, offset, cursor.num_streams, segments)
        offset -= length
        epoch, segments = epoch + 1, None


def stream_samples(split: SplitInfo, seed: int, block: int, stream: int,
                   cursor: Cursor, strict: bool = True) -> Iterator[tuple[int, int, int, dict]]:
    """Endless (epoch, order index, position in the stream's share of the epoch, raw sample) of
    one stream from the cursor on."""
    epoch, offset, segments = cursor.epoch, cursor.offset, cursor.segments
    while True:
        segs = segments[stream] if segments is not None else stream_segments(
            split.num_samples, cursor.num_streams, stream)
        order = iter_order(split, seed, epoch, block, _drop_prefix(segs, offset), strict)
        for position, (idx, raw) in enumerate(order, start=offset):
            yield epoch, idx, position, raw
        epoch, offset, segments = epoch + 1, 0, None


# ------------------------------------------------------------------------------------------------
# Datasets for the DataLoader
# ------------------------------------------------------------------------------------------------

class StreamSample(NamedTuple):
    """A raw sample as a stream reads it."""
    stream: int
    epoch: int
    index: int              # its place in the epoch's order
    position: int           # its place in the stream's share of the epoch
    raw: dict


class TrainStreams(IterableDataset):
    """One rank's share of the streams; worker k yields its share of every micro-batch.

    Each fetch reads `sub_batch` x images-per-example samples from each of the worker's streams
    (2 per example with DeepMind's disjoint pairs) and makes `sub_batch` examples per stream from
    them (pipeline/data/examples.py): a `Batch` on the CPU path; with `on_device` an `Encoded`
    (the JPEG bytes and every draw) for the device to make the same examples from.
    """

    def __init__(self, split: SplitInfo, recipe: ExampleRecipe, *, seed: int, block: int,
                 cursor: Cursor, rank: int, world: int, workers: int, sub_batch: int,
                 on_device: bool = False, strict: bool = True):
        self.split, self.recipe, self.on_device, self.strict = split, recipe, on_device, strict
        self.seed, self.block, self.cursor = seed, block, cursor
        self.rank, self.world, self.workers, self.sub_batch = rank, world, max(1, workers), sub_batch
        per_rank = cursor.num_streams // world
        self.per_worker = per_rank // self.workers
        self.per_stream = sub_batch * recipe.images_per_example     # samples per stream per fetch

    def streams_of_worker(self, worker: int) -> list[int]:
        first = self.rank * self.per_worker * self.workers + worker * self.per_worker
        return list(range(first, first + self.per_worker))

    def __iter__(self):
        info = get_worker_info()
        return self.iter_worker(info.id if info is not None else 0)

    def iter_worker(self, worker: int) -> Iterator[Batch | Encoded | LoaderFailure]:
        """The endless fetches of one dataloader worker of this rank. A DataError (a shard that
        changed since sharding) ends them with one LoaderFailure: the training process raises
        it, with one clear line instead of a worker traceback."""
        its = [(s, stream_samples(self.split, self.seed, self.block, s, self.cursor, self.strict))
               for s in self.streams_of_worker(worker)]
        try:
            while True:
                yield self.make_fetch([StreamSample(s, *next(it)) for s, it in its
                                       for _ in range(self.per_stream)])
        except DataError as e:
            yield LoaderFailure(str(e))

    def make_fetch(self, samples: list[StreamSample]) -> Batch | Encoded:
        """One fetch from its samples, in stream order. A sample that cannot be read or decoded
        is replaced by a readable one of the same fetch (the one before it, else after it:
        deterministic, so batches stay equal and resume exact) and reported in `bad`."""
        raws = [s.raw for s in samples]
        seeds = [sample_seed(self.seed, s.epoch, s.index) for s in samples]
        opened = [open_sample(raw, self.on_device) for raw in raws]
        problems = [problem for _, _, problem in opened]
        made: list = [None] * len(raws)        # per image: (its draw, its pixels on the CPU path)
        for i, (size, _, problem) in enumerate(opened):
            if problem:
                continue
            d = examples.draw_image(self.recipe, seeds[i], *size)
            try:
                pixels = None if self.on_device else examples.image_cpu(self.recipe, raws[i]["jpg"], d)
                made[i] = (d, pixels)
            except Exception as e:               # a file whose header reads but pixels do not
                problems[i] = problem_of(e)
        source = _replacements(problems)
        labels = torch.tensor([opened[j][1] for j in source])
        infos = [SampleInfo(seeds[j], s.stream, s.position) for s, j in zip(samples, source)]
        draws = examples.draw(self.recipe, infos, [made[j][0] for j in source], self.per_stream)
        a, b = zip(*draws.pairs)
        batch = Batch(torch.empty(0, dtype=torch.uint8), labels[list(a)], labels[list(b)],
                      draws.ratio(), [raw["__key__"] for raw in raws],
                      torch.tensor([s.epoch * self.split.num_samples + s.index for s in samples]),
                      [BadSample(raws[i]["__key__"], raws[i].get("__url__", "?"), p,
                                 raws[source[i]]["__key__"]) for i, p in enumerate(problems) if p],
                      [raw["__note__"] for raw in raws if "__note__" in raw])
        if self.on_device:
            return Encoded(*pack_jpegs([raws[j]["jpg"] for j in source]), draws, batch)
        batch.images = examples.build_cpu(self.recipe, [made[j][1] for j in source], draws)
        return batch


def _replacements(problems: list[str | None]) -> list[int]:
    """For each sample, the index of the sample used in its place: itself when readable, else the
    nearest readable one before it, else after it. Raises DataError when none is readable."""
    good = [i for i, p in enumerate(problems) if not p]
    if not good:
        raise DataError(f"no sample of a whole fetch ({len(problems)} samples) could be read: "
                        f"{problems[0]}")
    out = []
    for i, p in enumerate(problems):
        if not p:
            out.append(i)
        else:
            before = [g for g in good if g < i]
            out.append(before[-1] if before else good[0])
    return out


@dataclass
class StreamLayout:
    """How a run's micro-batches map onto streams (see the module docstring)."""
    num_streams: int
    sub_batch: int
    loader_workers: int    # DataLoader worker processes (0: read in the training process)
    per_worker: int        # streams per worker

    @property
    def fetches(self) -> int:
        """Loader batches per micro-batch: one from each worker."""
        return max(1, self.loader_workers)

    @classmethod
    def for_run(cls, micro_batch: int, world: int, workers: int,
             num_streams: int | None = None) -> StreamLayout:
        fetches = max(1, workers)
        if num_streams is None:
            # each worker delivers a whole share of every micro-batch, so use at most as many
            # workers as divide the micro-batch (F7 at 4 per GPU: 4 of 8 workers)
            fetches = max(d for d in range(1, fetches + 1) if micro_batch % d == 0)
            num_streams = world * fetches
        if num_streams % (world * fetches):
            raise ValueError(f"{num_streams} data streams cannot be shared equally by {world} "
                             f"processes x {fetches} dataloader workers")
        per_worker = num_streams // (world * fetches)
        per_rank = per_worker * fetches
        if micro_batch % per_rank:
            raise ValueError(f"micro_batch {micro_batch} must be a multiple of the streams per "
                             f"process ({per_rank} = {per_worker} per worker x {fetches} workers)")
        return cls(num_streams, micro_batch // per_rank, fetches if workers > 0 else 0, per_worker)
