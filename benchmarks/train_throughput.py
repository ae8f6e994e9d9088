"""Pretraining throughput, side by side in one run (issues #8, #15): what a timm user gets, our
training step alone, our data loader alone, our end-to-end pretrain stage, and peak memory.

    python benchmarks/train_throughput.py --compile          # GPU: F0, 192 px, batch 256, bf16
    python benchmarks/train_throughput.py --only memory --memory-variants f0 f1 f2 f3 f4 f5 f6 f7
    python benchmarks/train_throughput.py --cpu --iters 3     # CPU-sized: tiny NFNet, 64 px, batch 16
    bash benchmarks/gpu_check.sh                              # all of it on the GPU machine, < 8 min

Rows (img/s, step ms, MFU from torch.utils.flop_counter FLOPs, AGC ms and share, peak memory):
  timm    timm's dm_nfnet_* + SGD + timm.utils.adaptive_clip_grad, synthetic tensors on device
  ours    our model, optimizer groups and fused AGC (pipeline.agc), synthetic tensors on device
          (--compile adds a torch.compile row of each, compile time reported apart)
  loader  the training input alone, per mixing mode (--pairs: DeepMind's `disjoint`, 2 images per
          example, and `in_batch`) on real JPEG shards: CPU decode (timm transforms in --workers
          processes), device decode in the step's thread (`sync`) and with pipeline/data/prefetch.py
          (`prefetch`); device rows include the step's mixing and RandAugment after mixing
  e2e     stages/pretrain.py on those shards for --e2e-steps steps, per decode path and mixing
          mode (metrics.json: examples/s over the second half, compile s, peak memory)
  memory  each recipe's micro_batch at its train_res, 3 optimiser steps (our step + EMA copy, + a
          SAM buffer for fine-tuning): peak allocated / reserved, and whether it fits an 80 GB
          H100 / a 141 GB H200 with 10% headroom
Timing: CUDA events after warm-up, median of --iters steps; CPU: perf_counter medians. --json is
rewritten after every row, so a run stopped by its time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
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

# what nvidia-smi reports: H100 80 GB 81,559 MiB, H200 141 GB 143,771 MiB; keep 10% free
H100_GIB, H200_GIB, HEADROOM = 81559 / 1024, 143771 / 1024, 0.9


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


def _model_and_step(variant: str, res: int, batch: int, dev: torch.device, ours: bool,
                    compile_: bool):
    """(model, one optimiser step on synthetic (random, not zero) device tensors, AGC call)."""
    torch.manual_seed(0)
    v = get_variant(variant)
    if ours:
        model, _, _ = build_model(variant, 1000, v.drop_rate, 0.25, device=dev, seed=0)
    else:
        model = timm.create_model(v.timm_arch, num_classes=1000, drop_rate=v.drop_rate,
                                  drop_path_rate=0.25, **v.model_args()).to(dev)
    model = model.to(memory_format=torch.channels_last).train()
    split = split_parameters(model)
    if ours:
        opt = torch.optim.SGD([{"params": split.decay, "weight_decay": 2e-5},
                               {"params": split.no_decay, "weight_decay": 0.0}],
                              lr=0.1, momentum=0.9, nesterov=True)
        clip = AGC(split.clip, split.clip_whole, 0.01)
    else:                                      # what timm's train.py does with --clip-mode agc
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=2e-5)

        def clip():
            adaptive_clip_grad(split.clip, clip_factor=0.01, eps=1e-3)
    x = torch.randn(batch, 3, res, res, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    fwd = torch.compile(model) if compile_ else model
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(fwd(x), y, label_smoothing=0.1)
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=False)       # keep .grad allocated: AGC timing below reuses it
    return model, step, clip


def step_bench(name: str, variant: str, res: int, batch: int, dev: torch.device, ours: bool,
               compile_: bool, iters: int, warmup: int, peak_tflops: float) -> dict:
    """One optimiser step on synthetic device tensors: img/s, step ms, AGC ms and share, MFU."""
    model, step, clip = _model_and_step(variant, res, batch, dev, ours, compile_)
    flops = training_flops_per_image(model, res)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_compile = 0.0
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


# ------------------------------------------------------------------------------------------------
# Peak memory of each recipe's micro-batch
# ------------------------------------------------------------------------------------------------

def memory_bench(variant: str, stage: str, dev: torch.device, steps: int = 3) -> dict:
    """Peak memory of `steps` optimiser steps at the recipe's micro_batch and train_res, with an
    EMA copy of the weights (and SAM's perturbation buffer when the stage uses SAM)."""
    recipe = "demo.yaml" if variant == "tiny" else f"{variant}.yaml"
    section = getattr(load_recipe(ROOT / "recipes" / recipe), stage)
    res, batch = (64, 16) if variant == "tiny" else (section.train_res, section.micro_batch)
    row = {"row": f"memory {stage}", "variant": variant, "res": res, "batch": batch}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        model, step, _ = _model_and_step(variant, res, batch, dev, True, False)
        extra = [p.detach().clone() for p in model.parameters()]           # EMA
        if section.sam_rho:
            extra += [p.detach().clone() for p in model.parameters()]      # SAM's perturbation
        times = Timer(dev)(step, steps, 0)[1]
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "note": f"out of memory: {str(e).splitlines()[0][:80]}"}
    out = {**row, "step_ms": round(statistics.median(times[1:] or times), 1),
           "img_s": round(batch / statistics.median(times[1:] or times) * 1e3, 1)}
    if dev.type == "cuda":
        alloc = torch.cuda.max_memory_allocated(dev) / 2**30
        reserved = torch.cuda.max_memory_reserved(dev) / 2**30
        out.update(peak_gib=round(alloc, 2), reserved_gib=round(reserved, 2),
                   fits_h100=reserved + 1.0 <= HEADROOM * H100_GIB,   # + ~1 GiB CUDA context
                   fits_h200=reserved + 1.0 <= HEADROOM * H200_GIB)
    del model, step, extra
    return out


# ------------------------------------------------------------------------------------------------
# Shards, the loader alone, the stage end to end
# ------------------------------------------------------------------------------------------------

def _write_images(job: tuple[Path, int, int, int]) -> int:
    """One process's share of the generated JPEGs (per-image seeds: any split, same images)."""
    import numpy as np
    from shard_throughput import write_image
    root, lo, hi, classes = job
    return sum(write_image(root, i, classes, np.random.default_rng([0, i])) for i in range(lo, hi))


def make_shards(n: int, jobs: int | None = None, out: Path | None = None,
                recipe: str = "f0.yaml") -> Path:
    """ImageNet-like JPEGs (~400 x 350 px, ~110 KB) made on `jobs` cores, sharded by our shard
    stage (all cores, the recipe's shard section) into `out` (default: a temporary folder)."""
    tmp = out or Path(tempfile.mkdtemp(prefix="nfnet-bench-"))
    jobs = jobs or os.cpu_count() or 1
    cuts = [n * k // jobs for k in range(jobs + 1)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        pool.map(_write_images, [(tmp / "src", a, b, 10) for a, b in zip(cuts, cuts[1:]) if b > a])
    subprocess.run([sys.executable, str(ROOT / "stages" / "shard.py"), "--recipe",
                    str(ROOT / "recipes" / recipe), "--source", str(tmp / "src"), "--out",
                    str(tmp / "shards"), "--quiet", "shard.splits=[train]", "shard.shard_size=256"],
                   check=True)
    return tmp / "shards"


def _augment(recipe: str, pairs: str):
    return load_recipe(ROOT / "recipes" / recipe, [f"pretrain.augment.mix_pairs={pairs}"]).pretrain.augment


def loader_bench(shards: Path, res: int, batch: int, workers: int, decode: str, dev: torch.device,
                 recipe: str, pairs: str, batches: int) -> dict:
    """Examples/s of the training input alone, to the normalised model input on `dev`: `cpu`
    (examples made in the loader workers), `sync` (made on the device in this thread) or
    `prefetch` (pipeline/data/prefetch.py's thread and side stream)."""
    from pipeline.data.examples import ExampleRecipe
    from pipeline.data.loader import make_loader, micro_batches
    from pipeline.data.manifest import load_split
    from pipeline.data.prefetch import DevicePrefetcher, prepare
    from pipeline.data.reader import Cursor, TrainStreams
    from pipeline.data.transforms import normalize
    examples = ExampleRecipe.of(res, _augment(recipe, pairs))
    w = max(1, workers)
    ds = TrainStreams(load_split(shards, "train"), examples, seed=0, block=512,
                      cursor=Cursor(0, 0, w), rank=0, world=1, workers=w, sub_batch=batch // w,
                      on_device=decode != "cpu")
    it = micro_batches(make_loader(ds, workers, pin_memory=dev.type == "cuda"), w)
    if decode == "prefetch":
        it = DevicePrefetcher(it, examples, dev, lookahead=2)

    def model_input(item):
        b = prepare(item, examples, dev) if decode == "sync" else item
        return b, normalize(b.images.to(dev, non_blocking=True), True)
    for _ in range(2):                                    # workers started, first tars open
        model_input(next(it))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    images = 0
    for _ in range(batches):
        b, out = model_input(next(it))
        images += len(b.keys)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    if decode == "prefetch":
        it.close()
    return {"row": f"loader {decode}" + (f" ({workers} workers)" if decode == "cpu" else ""),
            "pairs": pairs, "res": res, "batch": batch, "img_s": round(batches * batch / sec, 1),
            "images_s": round(images / sec, 1), "shape": list(out.shape)}


def e2e_bench(shards: Path, recipe: str, steps: int, overrides: list[str], out_root: Path | None,
              timeout: float | None, flops: float = 0.0, peak_tflops: float = 790.0) -> dict:
    """stages/pretrain.py on the shards: examples/s over the second half of the steps."""
    out = Path(tempfile.mkdtemp(prefix="nfnet-e2e-", dir=out_root))
    cmd = [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--recipe", str(ROOT / "recipes" / recipe),
           "--shards", str(shards), "--out", str(out), f"pretrain.steps={steps}", "pretrain.epochs=null",
           "pretrain.warmup_steps=1", "pretrain.warmup_epochs=null",
           f"pretrain.log_every={max(1, steps // 2)}", "pretrain.checkpoint_every=0",
           "pretrain.eval_every=0", "pretrain.trackers=[]", *overrides]
    t = time.perf_counter()
    with open(out / "stage.log", "w") as log:
        p = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0:
        tail = (out / "stage.log").read_text(errors="replace")[-1500:]
        print(f"--- {out / 'stage.log'} (last lines) ---\n{tail}", flush=True)
        raise RuntimeError(f"stages/pretrain.py exited {p.returncode}: {tail[-300:]}")
    m = json.loads((out / "metrics.json").read_text())
    pairs = next((o.split("=")[1] for o in overrides if "mix_pairs" in o), "")
    decode = next((o.split("=")[1] for o in overrides if "loader.decode" in o), "")
    per_example = 2 if pairs == "disjoint" else 1
    return {"row": f"e2e pretrain stage, {decode} decode", "pairs": pairs,
            "img_s": round(m["img_per_s"], 1), "images_s": round(m["img_per_s"] * per_example, 1),
            "steps": m["steps"], "peak_gib": round(m["peak_mem_mb"] / 1024, 2),
            "mfu_pct": round(100 * flops * m["img_per_s"] / (peak_tflops * 1e12), 1) if flops else None,
            "compile_s": round(m.get("compile_s") or 0.0, 1),
            "wall_s": round(time.perf_counter() - t, 1), "overrides": overrides}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

class Rows:
    """The measured rows, written to --json after each one; rows past --budget are skipped. With
    `append`, each row is added to what the file holds, under a lock: several runs at once can
    share one file."""

    def __init__(self, path: Path | None, budget: float | None, env: dict, append: bool = False):
        self.path, self.budget, self.env, self.append, self.rows = path, budget, env, append, []
        self.t0 = time.perf_counter()

    def left(self) -> float | None:
        return None if self.budget is None else self.budget - (time.perf_counter() - self.t0)

    def add(self, name: str, fn, *args, **kwargs) -> None:
        left = self.left()
        if left is not None and left <= 0:
            row = {"row": name, "note": "skipped: time budget spent"}
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            try:
                row = fn(*args, **kwargs)
            except Exception as e:                       # one broken row must not lose the rest
                row = {"row": name, "note": f"failed: {type(e).__name__}: {str(e)[-400:]}"}
        print(f"[{time.strftime('%H:%M:%S')}] {json.dumps(row)}", flush=True)
        self.rows.append(row)
        self.save(row)

    def save(self, row: dict) -> None:
        if self.path is None:
            return
        import fcntl
        with open(Path(tempfile.gettempdir()) / f"{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rows = self.rows
            if self.append:
                old = json.loads(self.path.read_text())["rows"] if self.path.is_file() else []
                rows = old + [row]
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"env": self.env, "rows": rows}, indent=1))
            tmp.replace(self.path)


def print_table(rows: list[dict]) -> None:
    keys = ["row", "variant", "pairs", "res", "batch", "img_s", "images_s", "step_ms", "agc_ms",
            "agc_pct", "mfu_pct", "peak_gib", "compile_s", "note"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU-sized run: tiny NFNet, 64 px, batch 16")
    ap.add_argument("--variants", nargs="+", default=None, help="timm / ours rows (default f0)")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: recipe's)")
    ap.add_argument("--compile", action="store_true", help="+ torch.compile rows; e2e compiles")
    ap.add_argument("--no-eager", action="store_true", help="with --compile: compiled rows only")
    ap.add_argument("--only", nargs="+", default=["timm", "step", "loader", "e2e"],
                    choices=["timm", "step", "loader", "e2e", "memory"])
    ap.add_argument("--pairs", nargs="+", default=["disjoint", "in_batch"],
                    help="mixing modes of the loader and e2e rows")
    ap.add_argument("--decodes", nargs="+", default=["cpu", "sync", "prefetch"],
                    choices=["cpu", "sync", "prefetch"], help="loader rows (e2e: cpu / device)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--images", type=int, default=2048, help="JPEGs generated for loader / e2e")
    ap.add_argument("--shards", type=Path, help="use these shards instead of generating them")
    ap.add_argument("--make-shards", type=Path, metavar="DIR",
                    help="only generate --images JPEGs and shard them into DIR/shards, then exit")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--e2e-steps", type=int, default=30)
    ap.add_argument("--e2e-out", type=Path, help="folder for the e2e runs' outputs and logs")
    ap.add_argument("--memory-variants", nargs="+", default=None)
    ap.add_argument("--memory-stages", nargs="+", default=["pretrain"])
    ap.add_argument("--budget", type=float, help="seconds; rows after it are skipped")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="bf16 peak for MFU (H100 / H200: ~790 measured)")
    ap.add_argument("--json", type=Path, help="write the rows here (after every row)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --json")
    args = ap.parse_args(argv)
    if args.make_shards:
        t = time.perf_counter()
        print(f"{make_shards(args.images, out=args.make_shards)}: {args.images} JPEGs made and "
              f"sharded in {time.perf_counter() - t:.1f}s", flush=True)
        return 0
    dev = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    env = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "timm": timm.__version__, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env), flush=True)
    rows = Rows(args.json, args.budget, env, args.append)
    # most wanted first, in case the budget runs out: eager steps, the loader, the end-to-end
    # stage in DeepMind's mode, compiled steps, then the end-to-end stage in the other modes
    step_rows(rows, args, dev, compiled=False)
    shards = args.shards or (make_shards(args.images) if {"loader", "e2e"} & set(args.only) else None)
    if "loader" in args.only:
        loader_rows(rows, args, dev, shards)
    if "e2e" in args.only:
        e2e_rows(rows, args, shards, args.pairs[:1])
    step_rows(rows, args, dev, compiled=True)
    if "e2e" in args.only:
        e2e_rows(rows, args, shards, args.pairs[1:])
    if "memory" in args.only:
        for variant in args.memory_variants or (["tiny"] if args.cpu else [f"f{k}" for k in range(8)]):
            for stage in args.memory_stages:
                rows.add(f"memory {stage} {variant}", memory_bench, variant, stage, dev)
    print_table(rows.rows)
    return 0


def step_rows(rows: Rows, args, dev: torch.device, compiled: bool) -> None:
    """timm's and our step on synthetic data, eager or compiled (compiled: with --compile)."""
    if compiled and not args.compile or not compiled and args.compile and args.no_eager:
        return
    tag = ", compiled" if compiled else ""
    for variant in _variants(args):
        res, batch, _ = _size(variant, args)
        if "timm" in args.only:
            rows.add(f"timm + timm AGC{tag}", step_bench, f"timm + timm AGC{tag}", variant, res,
                     batch, dev, False, compiled, args.iters, 3, args.peak_tflops)
        if "step" in args.only:
            rows.add(f"ours (synthetic data){tag}", step_bench, f"ours (synthetic data){tag}",
                     variant, res, batch, dev, True, compiled, args.iters, 3, args.peak_tflops)


def _variants(args) -> list[str]:
    return args.variants or (["tiny"] if args.cpu else ["f0"])


def _size(variant: str, args) -> tuple[int, int, str]:
    """(train px, per-device batch, recipe file) of a variant's pretraining."""
    recipe = "demo.yaml" if variant == "tiny" else f"{variant}.yaml"
    res = 64 if args.cpu else get_variant(variant).train_res
    batch = args.batch or (16 if args.cpu else load_recipe(ROOT / "recipes" / recipe).pretrain.micro_batch)
    return res, batch, recipe


def loader_rows(rows: Rows, args, dev: torch.device, shards: Path) -> None:
    """The training input alone, per mixing mode and decode path, at the first variant's size."""
    res, batch, _ = _size(_variants(args)[0], args)
    for pairs in args.pairs:
        for decode in args.decodes:
            rows.add(f"loader {decode} {pairs}", loader_bench, shards, res, batch, args.workers,
                     decode, dev, "f0.yaml", pairs, max(4, args.iters))


def e2e_rows(rows: Rows, args, shards: Path, pairs_list: list[str]) -> None:
    """stages/pretrain.py per mixing mode and decode path (device first), compile per --compile."""
    variant = _variants(args)[0]
    res, batch, recipe = _size(variant, args)
    flops = training_flops_per_image(build_model(variant, 1000, device="meta")[0], res)
    flops = 0.0 if args.cpu else flops                     # no MFU for a CPU
    over = [f"pretrain.micro_batch={batch}", f"pretrain.global_batch={batch}",
            f"pretrain.loader.num_workers={args.workers}", f"pretrain.train_res={res}",
            f"pretrain.compile={str(args.compile).lower()}"]
    if args.cpu:
        over += ["pretrain.test_res=64"]
    decodes = [d for d in ("device", "cpu") if d == "cpu" and "cpu" in args.decodes
               or d == "device" and {"sync", "prefetch"} & set(args.decodes)]
    for pairs in pairs_list:
        for decode in decodes:
            left = rows.left()
            rows.add(f"e2e {decode} {pairs}", e2e_bench, shards, recipe,
                     args.e2e_steps if not args.cpu else 6,
                     over + [f"pretrain.loader.decode={decode}", f"pretrain.augment.mix_pairs={pairs}"],
                     args.e2e_out, None if left is None else max(1.0, left), flops, args.peak_tflops)


if __name__ == "__main__":
    sys.exit(main())
