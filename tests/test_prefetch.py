"""The device prefetcher (pipeline/data/prefetch.py): the same micro-batches, in the same order, as
the step's own device path, with the images decoded and augmented ahead of time; on the CPU
synchronously and with its background thread, and on a CUDA side stream with `-m gpu`."""
import itertools
import threading

import pytest
import torch

from conftest import ROOT
from pipeline.data.device_aug import DeviceAugment
from pipeline.data.manifest import load_split
from pipeline.data.prefetch import DevicePrefetcher, prepare
from pipeline.data.reader import Cursor, TrainStreams, concat_batches
from pipeline.data.transforms import train_augment
from pipeline.plan import make_plan as make_run_plan
from pipeline.recipe import load_recipe
from pipeline.runtime import make_accelerator
from pipeline.step import StepRunner

RES = 32
RA = ("randaugment_layers=2", "randaugment_magnitude=9", "hflip=true")
MODES = {
    "no mixing": ("mixup_alpha=0", "cutmix_alpha=0") + RA,
    "in_batch, RA before mixing": ("mixup_alpha=0.2", "cutmix_alpha=1.0", "mix_pairs=in_batch",
                                   "randaugment_order=before_mix") + RA,
    "DeepMind: disjoint, RA after mixing": ("mixup_alpha=0.2", "cutmix_alpha=1.0",
                                            "mix_pairs=disjoint", "randaugment_order=after_mix") + RA,
}


def section(mode: str):
    return load_recipe(ROOT / "recipes" / "demo.yaml", [f"pretrain.augment.{o}" for o in MODES[mode]] + [
        f"pretrain.train_res={RES}", f"pretrain.test_res={RES}", "pretrain.global_batch=8",
        "pretrain.micro_batch=8"]).pretrain


@pytest.fixture(scope="module")
def split(demo_shards):
    return load_split(demo_shards["pretrain"], "train")


def raw_batches(split, mode: str):
    """Endless raw micro-batches of the device path: two workers' fetches of 4 examples each."""
    aug = train_augment(RES, section(mode).augment)
    ds = TrainStreams(split, aug, seed=0, block=64, cursor=Cursor(0, 0, 2), rank=0, world=1,
                      workers=2, sub_batch=4, on_device=True)
    workers = [ds.iter_worker(k) for k in range(2)]
    while True:
        yield concat_batches([next(w) for w in workers])


def step_images(batch: dict, device_aug: DeviceAugment, ra_after_mix: bool) -> torch.Tensor:
    """What the step's device path makes of a raw batch today (pipeline/step.py, inputs)."""
    return device_aug(batch["jpeg"], batch["offsets"], batch["seed"],
                      randaugment=not ("mix_a" in batch and ra_after_mix))


def assert_same_batch(got: dict, raw: dict, images: torch.Tensor) -> None:
    assert set(got) == set(raw) - {"jpeg", "offsets"} | {"image"}
    assert torch.equal(got["image"], images)
    for k, v in raw.items():
        if k not in ("jpeg", "offsets"):
            assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k


@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_prefetched_batches_are_the_steps_batches(split, mode, lookahead):
    """Images, labels, keys, seeds and mix plans identical to what the step would make from the
    raw batches, in the same order; synchronous (the CPU default) and from the thread."""
    device_aug = DeviceAugment(RES, section(mode).augment, torch.device("cpu"))
    ra_after = section(mode).augment.randaugment_order == "after_mix"
    raws = list(itertools.islice(raw_batches(split, mode), 4))
    with DevicePrefetcher(raw_batches(split, mode), device_aug, lookahead=lookahead) as batches:
        got = list(itertools.islice(batches, 4))
    for g, raw in zip(got, raws):
        assert_same_batch(g, raw, step_images(raw, device_aug, ra_after))
    assert ("mix_a" in raws[0]) == (mode != "no mixing")
    assert len({tuple(g["key"]) for g in got}) == 4                     # four different batches


def test_images_mixed_later_get_no_randaugment_before_mixing(split):
    """DeepMind's order: the prefetcher crops and flips the images of a mix plan; RandAugment
    runs on the mixed examples, in the step."""
    mode = "DeepMind: disjoint, RA after mixing"
    device_aug = DeviceAugment(RES, section(mode).augment, torch.device("cpu"))
    raw = next(raw_batches(split, mode))
    got = prepare(raw, device_aug)
    assert torch.equal(got["image"], device_aug(raw["jpeg"], raw["offsets"], raw["seed"],
                                                randaugment=False))
    with_ra = device_aug(raw["jpeg"], raw["offsets"], raw["seed"], randaugment=True)
    assert not torch.equal(got["image"], with_ra)
    assert got["image"].shape == (16, 3, RES, RES) and len(got["mix_a"]) == 8   # 2 per example


def test_the_step_makes_the_same_examples_from_prefetched_batches(split):
    mode = "DeepMind: disjoint, RA after mixing"
    s = section(mode)
    device_aug = DeviceAugment(RES, s.augment, torch.device("cpu"))
    runner = StepRunner(make_accelerator("fp32"), None, None, None, None, s,
                        make_run_plan(s, 1000, 1), iter(()), device_aug=device_aug)
    raw = next(raw_batches(split, mode))
    expected = runner.inputs(raw)
    got = runner.inputs(prepare(raw, device_aug))
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_a_loader_error_passes_through_and_a_thread_error_reaches_the_consumer(split):
    device_aug = DeviceAugment(RES, section("no mixing").augment, torch.device("cpu"))
    assert prepare({"error": "shard x changed"}, device_aug) == {"error": "shard x changed"}

    def failing():
        yield next(raw_batches(split, "no mixing"))
        raise ValueError("a worker died")
    with DevicePrefetcher(failing(), device_aug, lookahead=2) as batches:
        assert "image" in next(batches)
        with pytest.raises(ValueError, match="a worker died"):
            next(batches)


def test_close_stops_the_thread_and_closes_the_source(split):
    """The first raw batch is read by the constructor's thread (a DataLoader forks its workers
    then: not from the prefetch thread); close() stops the thread, then closes the generator over
    the DataLoader (its workers shut down), as Trainer.close_data needs."""
    device_aug = DeviceAugment(RES, section("no mixing").augment, torch.device("cpu"))
    closed, readers = [], []

    def source():
        try:
            for batch in raw_batches(split, "no mixing"):
                readers.append(threading.current_thread())
                yield batch
        finally:
            closed.append(True)
    batches = DevicePrefetcher(source(), device_aug, lookahead=2)
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
    """Prepared on the thread's stream while the training stream is busy: the consumer's stream
    waits for each batch's event, so it reads finished images (a missing wait reads garbage)."""
    mode = "DeepMind: disjoint, RA after mixing"
    dev = torch.device("cuda")
    device_aug = DeviceAugment(RES, section(mode).augment, dev)
    expected = [prepare(b, device_aug)["image"]
                for b in itertools.islice(raw_batches(split, mode), 6)]
    got = []
    with DevicePrefetcher(raw_batches(split, mode), device_aug) as batches:
        assert batches.lookahead == 2
        for batch in itertools.islice(batches, 6):
            torch.cuda._sleep(50_000_000)            # the "step": the training stream is busy
            got.append(batch["image"].clone())
    torch.cuda.synchronize()
    for e, g in zip(expected, got):
        assert g.device.type == "cuda" and (e.int() - g.int()).abs().max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crops_on_gpu_equal_the_cpu_crops(split):
    """nvJPEG + float16 tensor-core products on the GPU against libjpeg-turbo + float32 on the
    CPU: the same crops up to the decoders' differences."""
    s = section("no mixing")
    raw = next(raw_batches(split, "no mixing"))
    cpu = DeviceAugment(RES, s.augment, torch.device("cpu"))
    gpu = DeviceAugment(RES, s.augment, torch.device("cuda"))
    images = cpu.decode(raw["jpeg"], raw["offsets"])
    params = [cpu.params(x, img.shape[1], img.shape[2], with_ops=False)
              for x, img in zip(raw["seed"], images)]
    on_cpu = cpu.crop_flip(images, params).float()
    on_gpu = gpu.crop_flip([img.cuda() for img in images], params).float().cpu()
    assert (on_cpu - on_gpu).abs().mean() < 0.01                       # same pixels in
    decoded = gpu.crop_flip(gpu.decode(raw["jpeg"], raw["offsets"]), params).float().cpu()
    assert (on_cpu - decoded).abs().mean() < 3                          # nvJPEG's decode
    # differently sized images: padded into one batch by torch.nested on the GPU
    torch.manual_seed(0)
    sizes = [(48, 48), (60, 41), (37, 52), (48, 48)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    params = [cpu.params(k, h, w, with_ops=False) for k, (h, w) in enumerate(sizes)]
    on_cpu = cpu.crop_flip(images, params).float()
    on_gpu = gpu.crop_flip([img.cuda() for img in images], params).float().cpu()
    assert (on_cpu - on_gpu).abs().mean() < 0.01
