"""How many CPU cores per GPU each F-variant's recipe needs on the CPU data path, and with
`loader.decode: device`: measured per-core loader rates against GPU step rates.

    python benchmarks/cores_per_gpu.py                        # F0-F7, 600 images each, 3 rounds
    python benchmarks/cores_per_gpu.py --variants f0 f3 --json cores.json

Per variant, on one core (benchmarks/loader_floor.py's rows, interleaved rounds, medians, per
CPU-second): our DataLoader in the recipe's own mode (DeepMind's: two images per example,
RandAugment after mixing, at the recipe's resolution and magnitude) and the CPU work that stays
with `decode: device` (tars, headers, draws). Shards: ImageNet-like JPEGs sharded with the
recipe's shard section.

GPU examples/s: F0's compiled bf16 step on an H100 (--f0-gpu, default 4,822 img/s at 192 px,
../shared/gpu/README.md: timm's model without AGC; ours adds AGC's share, at most 2%), scaled to
each variant by its training FLOPs per image at its resolution (torch.utils.flop_counter on the
meta device). A projection until the GPU check measures each variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from loader_floor import ours  # noqa: E402
from train_throughput import make_shards  # noqa: E402

from pipeline.data.manifest import load_split  # noqa: E402
from pipeline.plan import training_flops_per_image  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.variants import build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=[f"f{k}" for k in range(8)])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fetches", type=int, default=6)
    ap.add_argument("--f0-gpu", type=float, default=4822.0, help="F0 examples/s on one GPU")
    ap.add_argument("--cores-per-gpu", type=int, default=12, help="what a node has, per GPU")
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    rows, f0_flops = [], None
    for variant in args.variants:
        section = load_recipe(ROOT / "recipes" / f"{variant}.yaml").pretrain
        model, _, _ = build_model(section.model.variant, 1000, 0.0, 0.0, device="meta")
        flops = training_flops_per_image(model, section.train_res)
        if f0_flops is None:
            f0_flops = training_flops_per_image(build_model("f0", 1000, 0.0, 0.0, device="meta")[0], 192)
        split = load_split(make_shards(args.images, recipe=f"{variant}.yaml"), "train")
        batch = max(1, min(32, section.micro_batch))
        aug = section.augment
        cpu, dev = [], []
        for _ in range(args.rounds):
            cpu.append(ours(split, section, aug.mix_pairs, aug.randaugment_order, batch, args.fetches))
            dev.append(ours(split, section, aug.mix_pairs, aug.randaugment_order, batch,
                            args.fetches, on_device=True))
        gpu = args.f0_gpu * f0_flops / flops
        row = {"variant": variant, "train_res": section.train_res,
               "gflops_per_image": round(flops / 1e9, 1), "gpu_examples_s": round(gpu),
               "cpu_path_examples_s_per_core": round(statistics.median(cpu), 1),
               "device_path_examples_s_per_core": round(statistics.median(dev), 1)}
        row["cores_cpu_path"] = round(gpu / row["cpu_path_examples_s_per_core"], 1)
        row["cores_device_path"] = round(gpu / row["device_path_examples_s_per_core"], 1)
        row["decode_device_required"] = row["cores_cpu_path"] > args.cores_per_gpu
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| variant | train px | GFLOP/image | GPU examples/s (projected) | CPU path examples/s "
          f"per core | cores per GPU, CPU path | cores per GPU, decode: device | decode: device "
          f"needed ({args.cores_per_gpu} cores per GPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['variant'].upper()} | {r['train_res']} | {r['gflops_per_image']} | "
              f"{r['gpu_examples_s']:,} | {r['cpu_path_examples_s_per_core']} | "
              f"{r['cores_cpu_path']} | {r['cores_device_path']} | "
              f"{'yes' if r['decode_device_required'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "f0_gpu": args.f0_gpu}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
