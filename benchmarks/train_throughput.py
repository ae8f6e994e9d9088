"""Pretraining throughput, side by side in one run (issue #8): what a timm user gets, our training
step alone, our data loader alone, and our end-to-end pretrain stage.

    python benchmarks/train_throughput.py                  # GPU: F0, 192 px, batch 256, bf16
    python benchmarks/train_throughput.py --compile        # + torch.compile (compile time reported)
    python benchmarks/train_throughput.py --variants f0 f1 f2 f3 f4 f5 f6 f7 --only step
    python benchmarks/train_throughput.py --cpu            # CPU-sized: tiny NFNet, 64 px, batch 16

Rows (img/s, step ms, MFU from torch.utils.flop_counter FLOPs, AGC ms, peak memory):
  timm      timm's dm_nfnet_* + SGD + timm.utils.adaptive_clip_grad, synthetic tensors on device
  ours      our model, optimizer groups and fused AGC (pipeline.agc), synthetic tensors on device
  loader    TrainStreams over real JPEG shards, CPU decode (timm transforms) and device decode
  e2e       stages/pretrain.py on those shards for --e2e-steps steps (metrics.json img/s)
Timing: CUDA events after warm-up, median of --iters steps; CPU: perf_counter medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils.agc import adaptive_clip_grad  # noqa: E402

from pipeline.agc import AGC, split_parameters  # noqa: E402
from pipeline.plan import training_flops_per_image  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.variants import build_model, get_variant  # noqa: E402


class Timer:
    def __init__(self, dev: torch.device):
        self.dev = dev

    def __call__(self, fn, iters: int, warmup: int) -> tuple[float, list[float]]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), times


def step_bench(name: str, variant: str, res: int, batch: int, dev: torch.device, ours: bool,
               compile_: bool, iters: int, warmup: int, peak_tflops: float) -> dict:
    """One optimiser step on synthetic (random, not zero) device tensors."""
    torch.manual_seed(0)
    v = get_variant(variant)
    if ours:
        model, _, _ = build_model(variant, 1000, v.drop_rate, 0.25, device=dev, seed=0)
    else:
        model = timm.create_model(v.timm_arch, num_classes=1000, drop_rate=v.drop_rate,
                                  drop_path_rate=0.25, **v.model_args()).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    flops = training_flops_per_image(model, res)
    split = split_parameters(model)
    if ours:
        opt = torch.optim.SGD([{"params": split.decay, "weight_decay": 2e-5},
                               {"params": split.no_decay, "weight_decay": 0.0}],
                              lr=0.1, momentum=0.9, nesterov=True)
        agc = AGC(split.clip, split.clip_whole, 0.01)
        clip = agc
    else:                                      # what timm's train.py does with --clip-mode agc
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=2e-5)

        def clip():
            adaptive_clip_grad(split.clip, clip_factor=0.01, eps=1e-3)
    x = torch.randn(batch, 3, res, res, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    fwd = torch.compile(model) if compile_ else model
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    t_compile = 0.0

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(fwd(x), y, label_smoothing=0.1)
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=False)       # keep .grad allocated: AGC timing below reuses it

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if compile_:
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_compile = time.perf_counter() - t
    timer = Timer(dev)
    ms, _ = timer(step, iters, warmup)
    agc_ms, _ = timer(clip, iters, 2)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    ips = batch / ms * 1e3
    return {"row": name, "variant": variant, "res": res, "batch": batch, "img_s": round(ips, 1),
            "step_ms": round(ms, 2), "agc_ms": round(agc_ms, 3),
            "agc_pct": round(100 * agc_ms / ms, 2), "gflop_per_img": round(flops / 1e9, 2),
            "mfu_pct": round(100 * flops * ips / (peak_tflops * 1e12), 1) if dev.type == "cuda" else None,
            "peak_gib": round(peak, 2), "compile_s": round(t_compile, 1)}


def make_shards(n: int, size: tuple[int, int] = (400, 350)) -> Path:
    """ImageNet-like JPEGs (~110 KB) sharded by our shard stage into a temporary folder."""
    from shard_throughput import make_images
    tmp = Path(tempfile.mkdtemp(prefix="nfnet-bench-"))
    make_images(tmp / "src", n)                      # writes src/train/<class>/*.JPEG
    subprocess.run([sys.executable, str(ROOT / "stages" / "shard.py"), "--recipe",
                    str(ROOT / "recipes" / "f0.yaml"), "--source", str(tmp / "src"), "--out",
                    str(tmp / "shards"), "--quiet", "shard.splits=[train]", "shard.shard_size=256"],
                   check=True)
    return tmp / "shards"


def loader_bench(shards: Path, res: int, batch: int, workers: int, decode: str, dev: torch.device,
                 recipe: str, batches: int) -> dict:
    from pipeline.data.device_aug import DeviceAugment
    from pipeline.data.manifest import load_split
    from pipeline.data.reader import Cursor, TrainStreams, make_loader, micro_batches
    from pipeline.data.transforms import train_augment
    aug = load_recipe(ROOT / "recipes" / recipe).pretrain.augment
    split = load_split(shards, "train")
    w = max(1, workers)
    ds = TrainStreams(split, train_augment(res, aug), seed=0, block=512, cursor=Cursor(0, 0, w),
                      rank=0, world=1, workers=w, sub_batch=batch // w,
                      on_device=decode == "device")
    device_aug = DeviceAugment(res, aug, dev) if decode == "device" else None
    it = micro_batches(make_loader(ds, workers, pin_memory=dev.type == "cuda"), w)
    for _ in range(2):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        if device_aug is not None:
            out = device_aug(b["jpeg"], b["offsets"], b["seed"])
        else:
            out = b["image"].to(dev, non_blocking=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ips = batches * batch / (time.perf_counter() - t)
    return {"row": f"loader ({decode} decode, {workers} workers)", "res": res, "batch": batch,
            "img_s": round(ips, 1), "shape": list(out.shape)}


def e2e_bench(shards: Path, recipe: str, steps: int, overrides: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="nfnet-e2e-"))
    cmd = [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--recipe", str(ROOT / "recipes" / recipe),
           "--shards", str(shards), "--out", str(out), f"pretrain.steps={steps}", "pretrain.epochs=null",
           "pretrain.warmup_steps=1", "pretrain.warmup_epochs=null",
           f"pretrain.log_every={max(1, steps // 2)}",
           "pretrain.eval_every=0", "pretrain.trackers=[]", *overrides]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    m = json.loads((out / "metrics.json").read_text())
    return {"row": "e2e pretrain stage", "img_s": round(m["img_per_s"], 1), "steps": m["steps"],
            "peak_mem_mb": round(m["peak_mem_mb"]), "wall_s": round(time.perf_counter() - t, 1),
            "overrides": overrides}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU-sized run: tiny NFNet, 64 px, batch 16")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: recipe's)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", nargs="+", default=["timm", "step", "loader", "e2e"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--images", type=int, default=2048, help="JPEGs generated for loader / e2e")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--e2e-steps", type=int, default=60)
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="bf16 peak for MFU (H100: ~790 measured)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    variants = args.variants or (["tiny"] if args.cpu else ["f0"])
    rows = []
    for variant in variants:
        v = get_variant(variant)
        recipe = "demo.yaml" if variant == "tiny" else f"{variant}.yaml"
        res = 64 if args.cpu else v.train_res
        batch = args.batch or (16 if args.cpu else
                               load_recipe(ROOT / "recipes" / recipe).pretrain.micro_batch)
        if "timm" in args.only:
            rows.append(step_bench("timm + timm AGC", variant, res, batch, dev, False, args.compile,
                                   args.iters, 3, args.peak_tflops))
        if "step" in args.only:
            rows.append(step_bench("ours (synthetic data)", variant, res, batch, dev, True,
                                   args.compile, args.iters, 3, args.peak_tflops))
    if {"loader", "e2e"} & set(args.only):
        variant = variants[0]
        recipe = "demo.yaml" if variant == "tiny" else f"{variant}.yaml"
        res = 64 if args.cpu else get_variant(variant).train_res
        batch = args.batch or (16 if args.cpu else
                               load_recipe(ROOT / "recipes" / recipe).pretrain.micro_batch)
        shards = make_shards(args.images if not args.cpu else 256)
        if "loader" in args.only:
            for decode in (["cpu", "device"]):
                rows.append(loader_bench(shards, res, batch, args.workers, decode, dev,
                                         "f0.yaml", batches=max(4, args.iters)))
        if "e2e" in args.only:
            over = [f"pretrain.micro_batch={batch}", f"pretrain.global_batch={batch}",
                    f"pretrain.loader.num_workers={args.workers}", f"pretrain.train_res={res}"]
            if args.cpu:
                over += ["pretrain.test_res=64"]
            for decode in ("cpu", "device"):
                rows.append(e2e_bench(shards, recipe, args.e2e_steps if not args.cpu else 6,
                                      over + [f"pretrain.loader.decode={decode}"]))
    env = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "timm": timm.__version__, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env))
    keys = ["row", "variant", "res", "batch", "img_s", "step_ms", "agc_ms", "agc_pct", "mfu_pct",
            "peak_gib", "compile_s"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
