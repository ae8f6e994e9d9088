"""The CPU data path against its floor and against timm's own loader, side by side on one core.

    python benchmarks/loader_floor.py                          # F0's recipe at 192 px, core 1
    python benchmarks/loader_floor.py --images 600 --rounds 3  # quicker
    python benchmarks/loader_floor.py --json loader_floor.json --shards /tmp/bench/shards

The script pins itself (and so its loader worker) to one core (--core). Every row runs in every
round, rounds interleaved, and the table gives each row's median. Rates are per CPU-second of all
the processes a row uses (the training process and its one loader worker), so a busy machine
slows a row's wall clock but not its rate. Shards: --images ImageNet-like JPEGs (~400 x 350 px,
~110 KB) written on all cores and sharded by our shard stage with the recipe's shard section
(F0: at most 320 px), unless --shards names a folder.

Rows:
  floor_tar_sha          reading the tars and their sha256 (our shard reader)            images/s
  floor_decode           + PIL decode                                                     images/s
  floor_decode_crop_flip + random-resized crop (bicubic) + flip, to a uint8 array: the
                         floor any CPU loader pays per image                              images/s
  floor_rows_crop_flip   the same, decoding only the rows the crop needs: our loader's own
                         per-image work (examples.image_cpu), no RandAugment             images/s
  floor_timm_ra          + timm's RandAugment (the recipe's layers and magnitude)         images/s
  ours_deepmind          our DataLoader, DeepMind's mode: disjoint pairs (2 images per
                         example), mixing, then DeepMind's RandAugment per example        examples/s
  ours_in_batch          our DataLoader, in_batch pairs, RandAugment before mixing        examples/s
  ours_device_worker     `loader.decode: device`: what stays on the CPU (tars, headers,
                         draws; the GPU decodes)                                          examples/s
  timm_loader            timm's create_dataset('wds/...') + create_loader +
                         FastCollateMixup on the same shards, timm's RandAugment with the
                         recipe's layers and magnitude                                   examples/s
Ratios: ours_deepmind against the floor for two images (floor_decode_crop_flip / 2), and
ours_in_batch against timm_loader: the ratio of the rows' medians, and the median of the rounds'
own ratios. Within a round, floor_decode_crop_flip is measured twice, just before and just after
ours_deepmind, and the round's ratio uses their mean (a machine busy for a few seconds then
moves both sides alike); the table's floor_decode_crop_flip is the first measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.examples import ExampleRecipe, draw_image, image_cpu  # noqa: E402
from pipeline.data.loader import make_loader  # noqa: E402
from pipeline.data.manifest import load_split  # noqa: E402
from pipeline.data.reader import Cursor, TrainStreams, iter_order  # noqa: E402
from pipeline.data.samples import open_sample  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402

WARMUP = 6     # fetches before measuring: a fresh worker's first fetches pay copy-on-write faults
UNITS = {"floor_tar_sha": "images/s", "floor_decode": "images/s",
         "floor_decode_crop_flip": "images/s", "floor_rows_crop_flip": "images/s",
         "floor_timm_ra": "images/s",
         "ours_deepmind": "examples/s", "ours_in_batch": "examples/s",
         "ours_device_worker": "examples/s", "timm_loader": "examples/s"}


def cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the loader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def settled() -> float:
    """CPU seconds (as `cpu_seconds`) once the loader workers are idle: their prefetch queues
    full. Read before and after the measured fetches, so that exactly the fetches consumed in
    between were made in between (a queue filling up would count work not consumed yet)."""
    last = cpu_seconds()
    while True:
        time.sleep(0.1)
        now = cpu_seconds()
        if now - last < 0.002:
            return now
        last = now


def floors(split, n: int, res: int, layers: int, magnitude: int,
           rows: tuple[str, ...] = tuple(k for k in UNITS if k.startswith("floor"))
           ) -> dict[str, float]:
    """Images/s of each floor in `rows`: the same n samples through ever more of the work."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation
    rrc = RandomResizedCropAndInterpolation(res, scale=(0.08, 1.0), interpolation="bicubic")
    ra = rand_augment_transform(f"rand-m{magnitude}-n{layers}-mmax{max(10, magnitude)}-p1.0",
                                {"translate_const": int(res * 0.45), "img_mean": (124, 116, 104)})

    def run(decode: bool, crop: bool, augment: bool) -> float:
        t = cpu_seconds()
        for _, raw in iter_order(split, 0, 0, 512, [(0, n)]):
            if not decode:
                continue
            img = Image.open(io.BytesIO(raw["jpg"]))
            img = img.convert("RGB") if img.mode != "RGB" else img
            img.load()
            if crop:
                img = rrc(img)
                if random.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                if augment:
                    img = ra(img)
                np.asarray(img)
        return n / (cpu_seconds() - t)

    def rows_only() -> float:
        # our loader's per-image work (examples.image_cpu: the crop drawn from the header, only
        # its rows decoded, cropped, resized, flipped), with the floor's crop and no RandAugment
        plain = ExampleRecipe(res, crop_scale=(0.08, 1.0), hflip=True, interpolation="bicubic",
                              pairs="disjoint", mixup_alpha=0.0, cutmix_alpha=0.0, ra_layers=0,
                              ra_magnitude=0, ra_ops="deepmind", ra_order="after_mix")
        t = cpu_seconds()
        for i, (_, raw) in enumerate(iter_order(split, 0, 0, 512, [(0, n)])):
            size, _, _ = open_sample(raw, complete_jpeg=False)
            image_cpu(plain, raw["jpg"], draw_image(plain, i, *size))
        return n / (cpu_seconds() - t)
    how = {"floor_tar_sha": lambda: run(False, False, False),
           "floor_decode": lambda: run(True, False, False),
           "floor_decode_crop_flip": lambda: run(True, True, False),
           "floor_rows_crop_flip": rows_only,
           "floor_timm_ra": lambda: run(True, True, True)}
    return {k: how[k]() for k in rows}


def ours(split, section, pairs: str, order: str, sub_batch: int, fetches: int,
         on_device: bool = False) -> float:
    """Examples/s of our DataLoader (one worker process), in its steady state."""
    aug = dataclasses.replace(section.augment, mix_pairs=pairs, randaugment_order=order)
    recipe = ExampleRecipe.of(section.train_res, aug)
    ds = TrainStreams(split, recipe, seed=random.randrange(1000), block=512,
                      cursor=Cursor(0, 0, 1), rank=0, world=1, workers=1, sub_batch=sub_batch,
                      on_device=on_device)
    it = iter(make_loader(ds, 1))
    for _ in range(WARMUP):
        next(it)
    t = settled()
    for _ in range(fetches):
        next(it)
    rate = fetches * sub_batch / (settled() - t)
    del it
    return rate


def timm_loader(shards: Path, section, batch: int, fetches: int) -> float:
    """Examples/s of timm's own loader on the same shards (one worker process)."""
    from timm.data import FastCollateMixup, create_dataset, create_loader
    aug = section.augment
    ds = create_dataset(f"wds/{shards.name}", root=str(shards), split="train", is_training=True,
                        batch_size=batch)
    mixup = FastCollateMixup(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha,
                             label_smoothing=section.label_smoothing, num_classes=1000)
    spec = (f"rand-m{aug.randaugment_magnitude}-n{aug.randaugment_layers}-"
            f"mmax{max(10, aug.randaugment_magnitude)}-p1.0")
    loader = create_loader(ds, input_size=(3, section.train_res, section.train_res),
                           batch_size=batch, is_training=True, scale=tuple(aug.crop_scale),
                           auto_augment=spec, interpolation=aug.interpolation, num_workers=1,
                           collate_fn=mixup, use_prefetcher=True, device=torch.device("cpu"),
                           persistent_workers=False)
    it = iter(loader.loader)             # the workers' uint8 batches (no normalisation after)
    for _ in range(WARMUP):
        next(it)
    t = settled()
    for _ in range(fetches):
        next(it)
    rate = fetches * batch / (settled() - t)
    del it
    return rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="f0.yaml")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=Path, help="existing shards (default: made here)")
    ap.add_argument("--batch", type=int, default=32, help="examples per fetch (F0: 256 per GPU / 8 workers)")
    ap.add_argument("--fetches", type=int, default=8, help="measured fetches per row and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.core})              # the loader workers inherit it
    gc.freeze()      # every row then runs with the imports out of the collector's reach, as a
                     # training process does once it starts its loader (pipeline/data/loader.py)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    section = load_recipe(ROOT / "recipes" / args.recipe).pretrain
    shards = args.shards
    if shards is None:
        from train_throughput import make_shards
        shards = make_shards(args.images, recipe=args.recipe)
    split = load_split(shards, "train")
    n_floor = min(split.num_samples, 2 * args.batch * args.fetches)
    aug = section.augment
    rows: dict[str, list[float]] = {k: [] for k in UNITS}
    after: list[float] = []           # floor_decode_crop_flip again, right after ours_deepmind
    for r in range(args.rounds):
        got = floors(split, n_floor, section.train_res, aug.randaugment_layers,
                     aug.randaugment_magnitude)
        got["ours_deepmind"] = ours(split, section, "disjoint", "after_mix", args.batch, args.fetches)
        after.append(floors(split, n_floor, section.train_res, 0, 0, ("floor_decode_crop_flip",))
                     ["floor_decode_crop_flip"])
        got["timm_loader"] = timm_loader(shards, section, args.batch, args.fetches)
        got["ours_in_batch"] = ours(split, section, "in_batch", "before_mix", args.batch, args.fetches)
        got["ours_device_worker"] = ours(split, section, "disjoint", "after_mix", args.batch,
                                         args.fetches, on_device=True)
        for k, v in got.items():
            rows[k].append(v)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    two_image_floor = med["floor_decode_crop_flip"] / 2
    # the ratios of the medians, and the median of each round's ratio (rows of a round ran
    # minutes apart at most: a busy machine moves both sides of a round's ratio alike)
    per_round = [4 * o / (f + g) for o, f, g in
                 zip(rows["ours_deepmind"], rows["floor_decode_crop_flip"], after)]
    per_round_timm = [o / t for o, t in zip(rows["ours_in_batch"], rows["timm_loader"])]
    ratios = {"ours_deepmind_vs_floor": med["ours_deepmind"] / two_image_floor,
              "ours_in_batch_vs_timm": med["ours_in_batch"] / med["timm_loader"],
              "ours_deepmind_vs_floor_per_round": statistics.median(per_round),
              "ours_deepmind_vs_rows_floor": med["ours_deepmind"] / (med["floor_rows_crop_flip"] / 2),
              "ours_in_batch_vs_timm_per_round": statistics.median(per_round_timm)}
    cpu = platform.processor() or platform.machine()
    print(f"\n{args.recipe} at {section.train_res} px, one core ({cpu}), "
          f"torch {torch.__version__}, {split.num_samples} images in {shards}, "
          f"medians of {args.rounds} interleaved rounds, per CPU-second")
    print(f"{'row':>24} {'rate':>9} {'unit':<11} {'vs 2-image floor':>16}")
    for k, v in med.items():
        per_example = v if UNITS[k] == "examples/s" else v / 2
        print(f"{k:>24} {v:9.1f} {UNITS[k]:<11} {per_example / two_image_floor:15.2f}x")
    print(f"ours_deepmind / floor (2 images): {ratios['ours_deepmind_vs_floor']:.2f}x (median of the "
          f"rounds' ratios {ratios['ours_deepmind_vs_floor_per_round']:.2f}x)   ours_in_batch / "
          f"timm_loader: {ratios['ours_in_batch_vs_timm']:.2f}x "
          f"({ratios['ours_in_batch_vs_timm_per_round']:.2f}x)\n"
          f"ours_deepmind / floor decoding only the crops' rows (2 images): "
          f"{ratios['ours_deepmind_vs_rows_floor']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({**med, **ratios, "rounds": rows, "units": UNITS,
                                         "floor_decode_crop_flip_after": after,
                                         "recipe": args.recipe, "res": section.train_res,
                                         "batch": args.batch, "images": split.num_samples,
                                         "torch": torch.__version__}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
