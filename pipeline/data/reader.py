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

import io
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.manifest import SplitInfo
from pipeline.data.mixing import MixPlan, apply_plan, quantize
from pipeline.data.mixing import make_plan as make_mix_plan
from pipeline.data.shard_reader import DataError, PositionReader, fix_hint
from pipeline.data.transforms import TrainAugment
from pipeline.preemption import ignore_stop_signals

# ------------------------------------------------------------------------------------------------
# The epoch order
# ------------------------------------------------------------------------------------------------

def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)


def block_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, block, 0xB10C]).permutation(size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-sample augmentation seed: independent of which worker or rank reads the sample."""
    return int(np.random.default_rng([seed, epoch, index, 0xA06]).integers(2**31))


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
                   cursor: Cursor, strict: bool = True) -> Iterator[tuple[int, int, dict]]:
    """Endless (epoch, order index, raw sample) of one stream from the cursor on."""
    epoch, offset, segments = cursor.epoch, cursor.offset, cursor.segments
    while True:
        segs = segments[stream] if segments is not None else stream_segments(
            split.num_samples, cursor.num_streams, stream)
        for idx, raw in iter_order(split, seed, epoch, block, _drop_prefix(segs, offset), strict):
            yield epoch, idx, raw
        epoch, offset, segments = epoch + 1, 0, None


# ------------------------------------------------------------------------------------------------
# Datasets for the DataLoader
# ------------------------------------------------------------------------------------------------

def decode_sample(raw: dict) -> tuple[Image.Image, int]:
    key = raw.get("__key__", "?")
    try:
        img = Image.open(io.BytesIO(raw["jpg"]))
        img = img.convert("RGB")
        label = int(raw["cls"])
    except Exception as e:
        raise DataError(f"sample {key} in {raw.get('__url__', '?')} cannot be decoded ({e}); "
                        f"{fix_hint(raw.get('__url__', ''))}") from e
    return img, label


def _to_batch(images: list, labels: list, keys: list, index: list) -> dict:
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
            "key": keys, "index": torch.tensor(index, dtype=torch.long)}


class TrainStreams(IterableDataset):
    """One rank's share of the streams; worker k yields its share of every micro-batch.

    Each fetch reads `sub_batch` x `images_per_example` samples from each of the worker's streams
    (2 per example with DeepMind's disjoint pairs) and makes `sub_batch` examples per stream from
    them (pipeline/data/mixing.py: the mix plan of the chunk). On the CPU path the images are
    decoded and augmented here; with RandAugment after mixing, the examples are mixed and
    augmented here too. With `on_device` the JPEG bytes are passed on undecoded (with each
    sample's seed and the plan) for `device_aug.DeviceAugment` to do the same on the GPU.
    """

    def __init__(self, split: SplitInfo, augment: TrainAugment, *, seed: int, block: int,
                 cursor: Cursor, rank: int, world: int, workers: int, sub_batch: int,
                 on_device: bool = False, strict: bool = True):
        self.split, self.augment, self.on_device, self.strict = split, augment, on_device, strict
        self.seed, self.block, self.cursor = seed, block, cursor
        self.rank, self.world, self.workers, self.sub_batch = rank, world, max(1, workers), sub_batch
        per_rank = cursor.num_streams // world
        self.per_worker = per_rank // self.workers

    def streams_of_worker(self, worker: int) -> list[int]:
        first = self.rank * self.per_worker * self.workers + worker * self.per_worker
        return list(range(first, first + self.per_worker))

    def __iter__(self):
        info = get_worker_info()
        return self.iter_worker(info.id if info is not None else 0)

    def iter_worker(self, worker: int) -> Iterator[dict]:
        """The endless fetches of one dataloader worker of this rank. A DataError (a shard that
        changed since sharding) ends them with one {"error": message} fetch: the training
        process raises it, with one clear line instead of a worker traceback."""
        its = [stream_samples(self.split, self.seed, self.block, s, self.cursor, self.strict)
               for s in self.streams_of_worker(worker)]
        per_stream = self.sub_batch * self.augment.images_per_example
        try:
            while True:
                yield self.make_fetch([next(it) for it in its for _ in range(per_stream)])
        except DataError as e:
            yield {"error": str(e)}

    def make_fetch(self, samples: list[tuple[int, int, dict]]) -> dict:
        """One fetch from (epoch, order index, raw sample) triples, in stream order. A sample that
        cannot be read or decoded is replaced by a readable one of the same fetch (the one
        before it, else after it: deterministic, so batches stay equal and resume exact) and
        reported under "bad"."""
        aug = self.augment
        seeds = [sample_seed(self.seed, epoch, idx) for epoch, idx, _ in samples]
        raws = [raw for _, _, raw in samples]
        decoded = None if self.on_device else [self._decode(raw) for raw in raws]
        problems = [raw.get("__error__") or (_jpeg_problem(raw) if self.on_device else
                                             decoded[i][1]) for i, raw in enumerate(raws)]
        source = _replacements(problems)
        out: dict = {"key": [raw["__key__"] for raw in raws],
                     "index": torch.tensor([e * self.split.num_samples + i for e, i, _ in samples]),
                     "label": torch.tensor([_label(raws[j]) for j in source]),
                     "bad": [{"key": raws[i]["__key__"], "url": raws[i].get("__url__", "?"),
                              "reason": p, "replaced_by": raws[source[i]]["__key__"]}
                             for i, p in enumerate(problems) if p],
                     "notes": [raw["__note__"] for raw in raws if "__note__" in raw]}
        seeds = [seeds[j] for j in source]
        plan = (make_mix_plan(aug.pairs, seeds, aug.mixup_alpha, aug.cutmix_alpha,
                              (aug.res, aug.res)) if aug.mixing else None)
        if self.on_device:
            out["jpeg"], out["offsets"] = pack_jpegs([raws[j]["jpg"] for j in source])
            out["seed"] = seeds
            return {**out, **(plan.to_dict() if plan is not None else {})}
        images = torch.stack([self.image(decoded[j][0], seeds[i], with_ra=not aug.ra_after_mix)
                              for i, j in enumerate(source)])
        if plan is None:
            return {**out, "image": images}
        if not aug.ra_after_mix:                      # mixed on the device, in float
            return {**out, "image": images, **plan.to_dict()}
        mixed, ratio = apply_plan(images, plan)
        quantized = quantize(mixed)
        examples = [self.randaugment(quantized[i], e) for i, e in enumerate(plan.seed.tolist())]
        return {**out, "image": torch.stack(examples), "label": out["label"][plan.a],
                "label_b": out["label"][plan.b], "ratio": ratio}

    @staticmethod
    def _decode(raw: dict) -> tuple[Image.Image | None, str | None]:
        if raw.get("__error__"):
            return None, raw["__error__"]
        try:
            return decode_sample(raw)[0], None
        except DataError as e:
            cause = e.__cause__ or e
            reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(cause))
            return None, f"cannot be decoded ({type(cause).__name__}: {reason})"

    def image(self, img: Image.Image, seed: int, with_ra: bool) -> torch.Tensor:
        """Crop, flip (and RandAugment) of one decoded image, seeded by the sample: the same
        whichever worker or process reads it. timm's transforms draw from random, torch, numpy."""
        aug = self.augment
        _seed_all(seed)
        img = aug.crop_flip(img)
        if with_ra and aug.randaugment is not None:
            img = aug.randaugment(img)
        return aug.to_tensor(img)

    def randaugment(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """RandAugment of one mixed example (uint8 CHW), drawn from the example's seed."""
        _seed_all(seed)
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        return self.augment.to_tensor(self.augment.randaugment(pil))


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


def _jpeg_problem(raw: dict) -> str | None:
    """A cheap check for the device path (the GPU decodes): a JPEG starts with FFD8 and a
    complete one ends with FFD9; a missing image or label is a problem too."""
    data = raw.get("jpg")
    if not data:
        return "no jpg member"
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return "not a complete JPEG (truncated or damaged bytes)"
    try:
        int(raw["cls"])
    except Exception as e:
        return f"no readable label ({e})"
    return None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def pack_jpegs(raws: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Many JPEGs as one uint8 tensor + offsets: one shared-memory transfer per batch."""
    sizes = [len(r) for r in raws]
    offsets = torch.zeros(len(raws) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(sizes, dtype=torch.long).cumsum(0)
    buf = torch.frombuffer(bytearray(b"".join(raws)), dtype=torch.uint8) if raws else \
        torch.empty(0, dtype=torch.uint8)
    return buf, offsets


def _label(raw: dict) -> int:
    try:
        return int(raw["cls"])
    except Exception as e:
        raise DataError(f"sample {raw.get('__key__', '?')} in {raw.get('__url__', '?')} has no "
                        f"readable label ({e}); {fix_hint(raw.get('__url__', ''))}") from e


class EvalShards(IterableDataset):
    """Every sample of a split exactly once: contiguous position ranges per rank and worker, in
    shard order, the last batch of each worker possibly short. No padding, no duplicates."""

    def __init__(self, split: SplitInfo, transform: Callable, *, rank: int, world: int,
                 workers: int, batch: int):
        self.split, self.transform = split, transform
        self.rank, self.world, self.workers, self.batch = rank, world, max(1, workers), batch

    def positions(self, worker: int) -> tuple[int, int]:
        n, parts = self.split.num_samples, self.world * self.workers
        part = self.rank * self.workers + worker
        return part * n // parts, (part + 1) * n // parts

    def __iter__(self):
        info = get_worker_info()
        lo, hi = self.positions(info.id if info is not None else 0)
        reader = PositionReader(self.split, np.arange(len(self.split.urls)))
        for a in range(lo, hi, self.batch):
            raws = reader.read(a, min(a + self.batch, hi))
            images, labels = zip(*(decode_sample(r) for r in raws))
            yield _to_batch([self.transform(i) for i in images], list(labels),
                            [r["__key__"] for r in raws], list(range(a, a + len(raws))))


def make_loader(dataset: IterableDataset, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that passes the dataset's batches through. Not given to accelerate.prepare:
    that would re-split (or broadcast) data we have already split by rank."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)


def checked(batches: Iterator[dict], on_bad: Callable[[dict], None],
            on_note: Callable[[str], None] = print) -> Iterator[dict]:
    """The micro-batches, with the loader's findings handled in the training process: an "error"
    raises DataError (one line, no worker traceback); each replaced sample goes to `on_bad`,
    each note (a shard that differs from the manifest, loader.bad_samples: skip) to `on_note`."""
    for batch in batches:
        if "error" in batch:
            raise DataError(batch["error"])
        for record in batch.get("bad", ()):
            on_bad(record)
        for note in batch.get("notes", ()):
            on_note(note)
        yield batch


def micro_batches(loader: DataLoader, fetches: int) -> Iterator[dict]:
    """Concatenate `fetches` consecutive loader batches (one per worker) into a micro-batch."""
    it = iter(loader)
    while True:
        parts = [next(it) for _ in range(fetches)]
        yield parts[0] if fetches == 1 else concat_batches(parts)


def concat_batches(parts: list[dict]) -> dict:
    """One micro-batch from the fetches of the rank's workers (in worker order)."""
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        return {"error": errors[0]}
    out: dict = {"key": [k for p in parts for k in p["key"]],
                 "bad": [b for p in parts for b in p.get("bad", [])],
                 "notes": [n for p in parts for n in p.get("notes", [])]}
    for k in ("label", "index", "label_b", "ratio", "image"):
        if k in parts[0]:
            out[k] = torch.cat([p[k] for p in parts])
    if "jpeg" in parts[0]:                  # undecoded JPEG bytes: shift each part's offsets
        shift = torch.tensor([0] + [int(p["offsets"][-1]) for p in parts[:-1]]).cumsum(0)
        out["jpeg"] = torch.cat([p["jpeg"] for p in parts])
        out["offsets"] = torch.cat([parts[0]["offsets"][:1]] +
                                   [p["offsets"][1:] + s for p, s in zip(parts, shift)])
        out["seed"] = [x for p in parts for x in p["seed"]]
    if "mix_a" in parts[0]:                 # plans index their own fetch's images
        sizes = [len(p["key"]) for p in parts]
        out.update(MixPlan.concat([MixPlan.from_dict(p) for p in parts], sizes).to_dict())
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
    def plan(cls, micro_batch: int, world: int, workers: int,
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
