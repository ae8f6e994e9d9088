"""The device prefetcher (pipeline/data/prefetch.py): the same Batches, in the same order, as
making each encoded micro-batch on the device in the step's thread; on the CPU synchronously and
with its background thread, and on a CUDA side stream with `-m gpu`."""
import dataclasses
import itertools
import threading

import pytest
import torch

from conftest import ROOT
from pipeline.data.batch import Batch, Encoded, LoaderFailure
from pipeline.data.examples import ExampleRecipe
from pipeline.data.manifest import load_split
from pipeline.data.prefetch import DevicePrefetcher, prepare
from pipeline.data.randaugment import apply_batch
from pipeline.data.reader import Cursor, TrainStreams
from pipeline.data.resize import crop_flip
from pipeline.recipe import load_recipe

RES = 32
F0 = ExampleRecipe.of(RES, load_recipe(ROOT / "recipes" / "f0.yaml").pretrain.augment)
MODES = {
    "no mixing": dataclasses.replace(F0, mixup_alpha=0.0, cutmix_alpha=0.0),
    "in_batch, RA before mixing": dataclasses.replace(F0, pairs="in_batch", ra_order="before_mix"),
    "DeepMind: disjoint, RA after mixing": F0,
}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(demo_shards):
    return load_split(demo_shards["pretrain"], "train")


def encoded_batches(split, recipe: ExampleRecipe):
    """Endless encoded micro-batches of the device path: two workers' fetches of 4 examples."""
    ds = TrainStreams(split, recipe, seed=0, block=64, cursor=Cursor(0, 0, 2), rank=0, world=1,
                      workers=2, sub_batch=4, on_device=True)
    workers = [ds.iter_worker(k) for k in range(2)]
    while True:
        yield Encoded.concat([next(w) for w in workers])


def assert_same_batch(a: Batch, b: Batch) -> None:
    for f in ("images", "labels", "labels_b", "ratio", "index"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.keys == b.keys and a.bad == b.bad and a.notes == b.notes


@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_prefetched_batches_are_the_batches_made_in_place(split, mode, lookahead):
    recipe = MODES[mode]
    expected = [prepare(e, recipe, CPU) for e in itertools.islice(encoded_batches(split, recipe), 4)]
    with DevicePrefetcher(encoded_batches(split, recipe), recipe, CPU, lookahead=lookahead) as it:
        got = list(itertools.islice(it, 4))
    for g, e in zip(got, expected):
        assert_same_batch(g, e)
    assert len({tuple(g.keys) for g in got}) == 4                        # four different batches
    assert got[0].images.shape == (8, RES, RES, 3)
    assert (got[0].ratio < 1).any() == (mode != "no mixing")


def test_the_device_applies_randaugment_after_mixing_in_deepminds_order(split):
    """A micro-batch's examples are its crops, mixed, then RandAugmented: RandAugment never runs
    on images that are mixed later."""
    enc = next(encoded_batches(split, F0))
    from torchvision.io import ImageReadMode, decode_jpeg
    bounds = enc.offsets.tolist()
    images = decode_jpeg([enc.jpeg[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                         mode=ImageReadMode.RGB)
    crops = crop_flip(images, enc.draws.crops, RES, "bicubic")
    from pipeline.data.mixing import mix
    d = enc.draws
    mixed = mix(crops[[a for a, _ in d.pairs]], crops[[b for _, b in d.pairs]], d.mixes)
    assert torch.equal(prepare(enc, F0, CPU).images, apply_batch(mixed, d.ops))


def test_a_loader_failure_passes_through_and_a_thread_error_reaches_the_consumer(split):
    failure = LoaderFailure("shard x changed")
    assert prepare(failure, F0, CPU) is failure

    def failing():
        yield next(encoded_batches(split, F0))
        raise ValueError("a worker died")
    with DevicePrefetcher(failing(), F0, CPU, lookahead=2) as batches:
        assert isinstance(next(batches), Batch)
        with pytest.raises(ValueError, match="a worker died"):
            next(batches)


def test_close_stops_the_thread_and_closes_the_source(split):
    """The first batch is read by the constructor's thread (a DataLoader forks its workers
    then: not from the prefetch thread); close() stops the thread, then closes the generator over
    the DataLoader (its workers shut down), as Trainer.close_data needs."""
    closed, readers = [], []

    def source():
        try:
            for batch in encoded_batches(split, F0):
                readers.append(threading.current_thread())
                yield batch
        finally:
            closed.append(True)
    batches = DevicePrefetcher(source(), F0, CPU, lookahead=2)
    assert readers == [threading.main_thread()]
    next(batches)
    thread = batches._thread
    batches.close()
    assert not thread.is_alive() and closed == [True]
    assert readers[1] is thread                        # the rest: the prefetch thread
    with pytest.raises(StopIteration):
        next(batches)


# ------------------------------------------------------------------------------------------------
# CUDA: the side stream and its synchronisation (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_side_stream_batches_equal_the_synchronous_ones_on_gpu(split):
    """Made on the thread's stream while the training stream is busy: the consumer's stream
    waits for each batch's event, so it reads finished images (a missing wait reads garbage)."""
    dev = torch.device("cuda")
    expected = [prepare(b, F0, dev).images for b in itertools.islice(encoded_batches(split, F0), 6)]
    got = []
    with DevicePrefetcher(encoded_batches(split, F0), F0, dev) as batches:
        assert batches.lookahead == 2
        for batch in itertools.islice(batches, 6):
            torch.cuda._sleep(50_000_000)            # the "step": the training stream is busy
            got.append(batch.images.clone())
    torch.cuda.synchronize()
    for e, g in zip(expected, got):
        assert g.device.type == "cuda" and torch.equal(e, g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_examples_on_gpu_equal_the_cpu_examples(split):
    """nvJPEG, float16 tensor-core crops and the batched operations on the GPU against the CPU
    path on the same bytes and draws: the decoders differ, the rest agrees."""
    enc = next(encoded_batches(split, F0))
    on_cpu = prepare(enc, F0, CPU).images.float()
    on_gpu = prepare(enc, F0, torch.device("cuda")).images.float().cpu()
    assert (on_cpu - on_gpu).abs().mean() < 3                            # nvJPEG's decode
    torch.manual_seed(0)
    sizes = [(48, 48), (60, 41), (37, 52), (48, 48)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    crops = [(2, 3, h - 5, w - 4, k % 2 == 1) for k, (h, w) in enumerate(sizes)]
    a = crop_flip(images, crops, RES, "bicubic").float()
    b = crop_flip([i.cuda() for i in images], crops, RES, "bicubic").float().cpu()
    assert (a - b).abs().mean() < 0.01                                  # the same pixels in
