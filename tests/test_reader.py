"""The training data order: exactly once per epoch, equal work per rank, exact and elastic resume.

Ranks and dataloader workers are emulated in-process here (the DataLoader's round-robin over its
workers is what `rank_batches` reproduces); tests/test_distributed.py runs real processes.
"""
import itertools

import pytest
import torch

from conftest import ROOT
from pipeline.data.batch import Batch
from pipeline.data.examples import ExampleRecipe
from pipeline.data.loader import EvalShards, make_loader, micro_batches
from pipeline.data.manifest import load_split
from pipeline.data.reader import (
    Cursor,
    StreamLayout,
    TrainStreams,
    advance,
    rescale_cursor,
    shard_order,
)
from pipeline.data.transforms import eval_transform
from pipeline.recipe import load_recipe

ROOT_RECIPE = ROOT / "recipes" / "demo.yaml"
TRANSFORM = eval_transform(16, 1.0, "bilinear")
AUGMENT = ExampleRecipe.of(16, load_recipe(ROOT_RECIPE).pretrain.augment)   # one image per example


def streams(split, cursor, rank, world, workers, sub_batch, seed=0, block=50):
    return TrainStreams(split, AUGMENT, seed=seed, block=block, cursor=cursor, rank=rank,
                        world=world, workers=workers, sub_batch=sub_batch)


def rank_batches(split, cursor, rank, world, workers, sub_batch, steps, **kw):
    """A rank's first `steps` micro-batches: one batch from each worker, round-robin."""
    ds = streams(split, cursor, rank, world, workers, sub_batch, **kw)
    its = [ds.iter_worker(k) for k in range(workers)]
    out = []
    for _ in range(steps):
        out.append(Batch.concat([next(it) for it in its]))
    return out


def global_batches(split, cursor, world, workers, micro_batch, steps, **kw):
    layout = StreamLayout.for_run(micro_batch, world, workers, cursor.num_streams or None)
    cursor = Cursor(cursor.epoch, cursor.offset, layout.num_streams, cursor.segments)
    per_rank = [rank_batches(split, cursor, r, world, workers, layout.sub_batch, steps, **kw)
                for r in range(world)]
    return [[k for r in range(world) for k in per_rank[r][s].keys] for s in range(steps)]


@pytest.fixture(scope="module")
def split(demo_shards):
    return load_split(demo_shards["pretrain"], "train")


def test_one_epoch_reads_every_sample_once(split):
    world, workers, micro = 2, 2, 8
    layout = StreamLayout.for_run(micro, world, workers)                  # 4 streams, sub-batch 4
    n_streams = layout.num_streams
    per_stream = split.num_samples // n_streams
    steps = per_stream // layout.sub_batch
    batches = global_batches(split, Cursor(0, 0, n_streams), world, workers, micro, steps)
    keys = [k for b in batches for k in b]
    assert len(keys) == len(set(keys))                                  # no duplicates
    all_keys = set()
    for url in split.urls:
        from pipeline.data.shard_reader import open_shard
        all_keys |= {s["__key__"] for s in open_shard(url)}
    missing = all_keys - set(keys)
    # the documented remainder: N - S * L (< S) plus the partial last sub-batch of each stream
    assert len(missing) == split.num_samples - n_streams * steps * layout.sub_batch
    assert len(missing) < n_streams * (layout.sub_batch + 1)


def test_ranks_get_equal_batches_and_different_samples(split):
    per_rank = [rank_batches(split, Cursor(0, 0, 4), r, 2, 2, 4, steps=10) for r in range(2)]
    assert [len(b) for b in per_rank] == [10, 10]
    assert all(len(b.keys) == 8 == len(b) for rb in per_rank for b in rb)
    assert not ({k for b in per_rank[0] for k in b.keys} & {k for b in per_rank[1] for k in b.keys})


def test_global_batches_do_not_depend_on_how_streams_map_to_processes(split):
    one = global_batches(split, Cursor(0, 0, 0), world=1, workers=2, micro_batch=16, steps=30)
    two = global_batches(split, Cursor(0, 0, 0), world=2, workers=1, micro_batch=8, steps=30)
    assert [sorted(b) for b in one] == [sorted(b) for b in two]


def test_images_are_augmented_identically_wherever_they_are_read(split):
    aug = ExampleRecipe.of(24, load_recipe(ROOT_RECIPE).pretrain.augment)
    kw = dict(seed=3, block=50)

    def images(world, workers, micro):
        layout = StreamLayout.for_run(micro, world, workers)
        out = {}
        for r in range(world):
            ds = TrainStreams(split, aug, cursor=Cursor(0, 0, layout.num_streams),
                              rank=r, world=world, workers=workers, sub_batch=layout.sub_batch, **kw)
            for k in range(workers):
                b = next(ds.iter_worker(k))
                out.update({key: img for key, img in zip(b.keys, b.images)})
        return out

    a, b = images(1, 2, 8), images(2, 1, 4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shard_order_changes_every_epoch_but_is_shared():
    orders = [tuple(shard_order(12, seed=0, epoch=e)) for e in range(5)]
    assert len(set(orders)) == 5
    assert orders[0] == tuple(shard_order(12, seed=0, epoch=0))


def test_resume_from_a_cursor_continues_the_exact_sequence(split):
    world, workers, micro = 2, 2, 8
    full = global_batches(split, Cursor(0, 0, 0), world, workers, micro, steps=70)  # > 1 epoch
    layout = StreamLayout.for_run(micro, world, workers)
    for done in (7, 44, 45):                                          # mid-epoch and across epochs
        cursor = advance(Cursor(0, 0, layout.num_streams), split.num_samples, done * layout.sub_batch)
        rest = global_batches(split, cursor, world, workers, micro, steps=70 - done)
        assert rest == full[done:], done


def test_resume_on_a_different_number_of_streams_finishes_the_epoch_exactly(split):
    layout = StreamLayout.for_run(8, 1, 2)                              # 2 streams
    epoch_len = split.num_samples // 2
    done = 17
    before = global_batches(split, Cursor(0, 0, 2), 1, 2, 8, steps=done)
    cursor = advance(Cursor(0, 0, 2), split.num_samples, done * layout.sub_batch)
    cursor3 = rescale_cursor(cursor, split.num_samples, 3)           # now 3 processes x 1 worker
    rest_len = (2 * (epoch_len - done * layout.sub_batch)) // 3
    steps = rest_len // 2                                            # sub-batch 2 per stream
    after = global_batches(split, cursor3, 3, 1, 2, steps=steps)
    seen = [k for b in before + after for k in b]
    assert len(seen) == len(set(seen))                               # nothing twice
    assert split.num_samples - len(seen) < 2 * 3 + 3 * 2 + 2         # only the small remainders left
    # and the next epoch starts with the new layout
    nxt = advance(cursor3, split.num_samples, rest_len)
    assert nxt.epoch == 1 and nxt.segments is None and nxt.num_streams == 3


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 32), (3, 2, 10), (2, 3, 64)])
def test_eval_reads_every_sample_exactly_once(split, world, workers, batch):
    seen = []
    for r in range(world):
        ds = EvalShards(split, TRANSFORM, rank=r, world=world, workers=workers, batch=batch)
        for k in range(workers):
            lo, hi = ds.positions(k)
            seen.extend(range(lo, hi))
    assert sorted(seen) == list(range(split.num_samples))


def test_real_dataloader_workers_give_the_emulated_sequence(split):
    layout = StreamLayout.for_run(8, 1, 2)
    ds = streams(split, Cursor(0, 0, layout.num_streams), 0, 1, 2, layout.sub_batch)
    loader = make_loader(ds, 2)
    real = [b.keys for b in itertools.islice(micro_batches(loader, 2), 12)]
    emulated = [b.keys for b in rank_batches(split, Cursor(0, 0, 2), 0, 1, 2, 4, steps=12)]
    assert real == emulated


def test_batches_from_workers_survive_the_reuse_of_the_workers_buffers(split):
    """Loader workers write their fetches in a ring of shared buffers they reuse; every batch is
    copied out as it arrives, so batches held across many later fetches keep their pixels."""
    recipe = ExampleRecipe.of(24, load_recipe(ROOT / "recipes" / "f0.yaml").pretrain.augment)
    kw = dict(seed=1, block=50, cursor=Cursor(0, 0, 1), rank=0, world=1, workers=1, sub_batch=4)
    held = list(itertools.islice(micro_batches(make_loader(TrainStreams(split, recipe, **kw), 1),
                                               1), 20))                # > the ring's 6 buffers
    alone = TrainStreams(split, recipe, **kw).iter_worker(0)
    for got in held:
        expected = next(alone)
        assert got.keys == expected.keys and torch.equal(got.images, expected.images)
        assert torch.equal(got.ratio, expected.ratio) and torch.equal(got.labels_b, expected.labels_b)


def test_batches_mix_classes_and_follow_the_block_permutation(split):
    from pipeline.data.shard_reader import PositionReader
    ds = streams(split, Cursor(0, 0, 1), 0, 1, 1, 32)               # one stream, block 50
    first = next(ds.iter_worker(0))
    assert len(set(first.labels.tolist())) >= 4                    # 5 classes, shuffled
    in_shard_order = [r["__key__"] for r in
                      PositionReader(split, shard_order(len(split.urls), 0, 0)).read(0, 50)]
    assert set(first.keys) <= set(in_shard_order)                  # drawn from the first block
    assert first.keys != in_shard_order[:32]                        # ... in a permuted order


@pytest.mark.parametrize("damage", ["header cut after its frame", "pixels cut short"])
def test_a_jpeg_whose_frame_reads_but_whose_image_does_not_is_replaced_and_named(split, damage):
    """The CPU path takes a JPEG's size from its frame header and opens it only to decode its
    crop's rows (samples.open_rows): bytes that PIL cannot open past the frame, or whose crop's
    rows do not decode, are replaced like any unreadable sample, with PIL's reason."""
    from pipeline.data.reader import StreamSample, iter_order
    from pipeline.data.samples import jpeg_frame
    raws = [raw for _, raw in itertools.islice(iter_order(split, 0, 0, 50, [(0, 4)]), 4)]
    jpg = raws[1]["jpg"]
    frame = jpeg_frame(jpg)
    end = frame.height_at + 20 if damage.startswith("header") else jpg.index(b"\xff\xda") + 40
    assert jpeg_frame(jpg[:end]) == frame                      # its size still reads
    raws[1] = {**raws[1], "jpg": jpg[:end]}
    batch = streams(split, Cursor(0, 0, 1), 0, 1, 1, 4).make_fetch(
        [StreamSample(0, 0, i, i, raw) for i, raw in enumerate(raws)])
    assert len(batch) == 4
    (bad,) = batch.bad
    assert bad.key == raws[1]["__key__"] and bad.replaced_by == raws[0]["__key__"]
    assert bad.reason.startswith("cannot be decoded"), bad.reason
