"""Per-device batch that fits a GPU, estimated without one: bytes saved for backward per image,
counted on the meta device under bf16 autocast, for every variant at its train and test px.

    python benchmarks/memory_estimate.py                 # F0-F7, F4+, the BN baselines; 80 GB
    python benchmarks/memory_estimate.py --gib 141 --variants f6 f7

Estimate = fixed (fp32 weights, grads, momentum, EMA: 16 B/param, + the per-step weight copies)
+ batch x saved activations. The recipes' micro_batch is the largest power of two within 80% of
what fits in 75% of the GPU (headroom for workspace, fragmentation and temporaries); verify with
benchmarks/train_throughput.py on the GPU, which reports real peak memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.variants import VARIANTS, build_model  # noqa: E402


def saved_bytes(variant: str, res: int, batch: int) -> int:
    model, _, _ = build_model(variant, 1000, device="meta")
    model = model.to(memory_format=torch.channels_last)
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t
    x = torch.empty(batch, 3, res, res, device="meta").to(memory_format=torch.channels_last)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    return sum(seen.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+",
                    default=[f"f{i}" for i in range(8)] + ["f4+", "resnet50", "seresnext50"])
    ap.add_argument("--gib", type=float, default=80.0)
    args = ap.parse_args(argv)
    print("variant | px | MiB saved / image | fixed GiB | batch that fits | suggested micro_batch")
    for name in args.variants:
        v = VARIANTS[name]
        params = sum(p.numel() for p in build_model(name, 1000, device="meta")[0].parameters())
        for res in sorted({v.train_res, v.test_res, 224}):
            one, nine = saved_bytes(name, res, 1), saved_bytes(name, res, 9)
            per_img = (nine - one) / 8                      # what grows with the batch
            fixed = params * 16 + (one - per_img)           # optimizer state + weight copies
            fits = int((0.75 * args.gib * 2**30 - fixed) / per_img)
            suggest = 1 << max(0, int(0.8 * fits).bit_length() - 1)
            print(f"{name} | {res} | {per_img / 2**20:.0f} | {fixed / 2**30:.1f} | {fits} | {suggest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
