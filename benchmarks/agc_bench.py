"""AGC cost: ours (grouped, fused) vs timm's per-tensor `adaptive_clip_grad`, on a real NFNet's
parameters with realistic gradients.

    python benchmarks/agc_bench.py                        # CPU: F0 (233 tensors), median of 20
    python benchmarks/agc_bench.py --variant f1 --device cuda --repeat 50

Both clip exactly the same set of tensors (every parameter but the classifier weight) and the
result is checked to agree before timing. On CUDA, times are CUDA-event medians after warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils.agc import adaptive_clip_grad  # noqa: E402
from train_throughput import Timer  # noqa: E402

from pipeline.agc import AGC, split_parameters  # noqa: E402
from pipeline.variants import build_model  # noqa: E402


def timed(fn, device, repeat, warmup=3):
    return Timer(device)(fn, repeat, warmup)[0]      # CUDA events / perf_counter medians


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="f0")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--clip", type=float, default=0.01)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model, _, _ = build_model(args.variant, 1000, device=dev)
    model = model.to(memory_format=torch.channels_last)
    split = split_parameters(model)
    for p in model.parameters():          # gradients of a realistic scale, never all zero
        p.grad = torch.randn_like(p) * 1e-3
    originals = [p.grad.clone() for p in split.clip]

    def reset():
        for p, g in zip(split.clip, originals):
            p.grad.copy_(g)

    ours = AGC(split.clip, split.clip_whole, args.clip)
    ours()
    ours_result = [p.grad.clone() for p in split.clip]
    reset()
    adaptive_clip_grad(split.clip, clip_factor=args.clip, eps=1e-3)
    # timm clips WS gains (O,1,1,1) per element and we clip them as one unit (DeepMind), so
    # compare on the tensors where the two definitions coincide
    same = [i for i, w in enumerate(split.clip_whole) if not (w and split.clip[i].ndim > 1)]
    err = max((ours_result[i] - split.clip[i].grad).abs().max().item() for i in same)
    reset()

    def run_ours():
        ours()

    def run_timm():
        adaptive_clip_grad(split.clip, clip_factor=args.clip, eps=1e-3)

    ms_ours = timed(run_ours, dev, args.repeat)
    ms_timm = timed(run_timm, dev, args.repeat)
    result = {
        "variant": args.variant, "device": str(dev),
        "device_name": (torch.cuda.get_device_name() if dev.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "tensors_clipped": len(split.clip),
        "groups": len(ours.groups), "params_m": round(sum(p.numel() for p in split.clip) / 1e6, 2),
        "ours_ms": round(ms_ours, 3), "timm_ms": round(ms_timm, 3),
        "speedup": round(ms_timm / ms_ours, 2), "max_abs_diff_vs_timm": err,
        "torch": torch.__version__, "timm": timm.__version__,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
