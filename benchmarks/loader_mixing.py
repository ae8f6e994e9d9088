"""What DeepMind's data path costs the CPU loader: examples/s of one loader worker (one core) for
each way of forming the mixed examples, on ImageNet-sized JPEG shards.

    python benchmarks/loader_mixing.py                       # F0's augmentation at 192 px
    python benchmarks/loader_mixing.py --images 300 --fetches 3   # quicker

Modes (pretrain.augment.mix_pairs / randaugment_order):
  in_batch  + before_mix   n images -> n examples; RandAugment per image, mixed on the device
  disjoint  + before_mix   2n images -> n examples; RandAugment per image, mixed on the device
  disjoint  + after_mix    2n images -> n examples; mixed in the worker, RandAugment per example
                           (DeepMind's F-variant configuration)
The worker's work per example is what the table compares: decoding and cropping 2 images instead
of 1, and RandAugment on n mixed examples instead of 2n images (or n).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from train_throughput import make_shards

from pipeline.data.manifest import load_split
from pipeline.data.reader import Cursor, TrainStreams
from pipeline.data.transforms import train_augment
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODES = [("in_batch", "before_mix"), ("disjoint", "before_mix"), ("disjoint", "after_mix")]


def bench(shards: Path, recipe: str, pairs: str, order: str, sub_batch: int, fetches: int) -> dict:
    section = load_recipe(ROOT / "recipes" / recipe, [f"pretrain.augment.mix_pairs={pairs}",
                                                      f"pretrain.augment.randaugment_order={order}"])
    aug = train_augment(section.pretrain.train_res, section.pretrain.augment)
    ds = TrainStreams(load_split(shards, "train"), aug, seed=0, block=512,
                      cursor=Cursor(0, 0, 1), rank=0, world=1, workers=1, sub_batch=sub_batch)
    it = ds.iter_worker(0)
    next(it)                                                   # warm-up: opens the first tar
    times = []
    for _ in range(fetches):
        t = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    n_img = len(batch["key"])
    return {"mode": f"{pairs} + {order}", "examples_s": sub_batch / sec, "images_s": n_img / sec,
            "images_per_example": aug.images_per_example}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="f0.yaml")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--sub-batch", type=int, default=32, help="examples per fetch")
    ap.add_argument("--fetches", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shards = make_shards(args.images)
    rows = [bench(shards, args.recipe, p, o, args.sub_batch, args.fetches) for p, o in MODES]
    base = rows[0]["examples_s"]
    print(f"{args.recipe}, one worker (1 core: {platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, median of {args.fetches} fetches of {args.sub_batch} examples")
    print(f"{'mode':>24} {'img/example':>11} {'examples/s':>10} {'images/s':>9} {'vs in_batch':>11}")
    for r in rows:
        print(f"{r['mode']:>24} {r['images_per_example']:>11} {r['examples_s']:>10.1f} "
              f"{r['images_s']:>9.1f} {r['examples_s'] / base:>10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
