r"""NF vs BN at equal budget: pretrain each recipe, then accuracy, gaps, time and memory.

    python ablations/nf_vs_bn.py --recipes recipes/f0.yaml recipes/resnet50.yaml \
        --shards /data/shards/imagenet --runs runs/compare --out reports/nf_vs_bn-f0 \
        --launcher 'accelerate launch --multi_gpu --num_processes 8' --timing-repeats 0 \
        pretrain.epochs=90                                                   # full scale
    python ablations/nf_vs_bn.py --recipes recipes/demo.yaml recipes/demo_bn.yaml \
        --shards ablations/data/shards --runs ablations/runs/compare --out reports/nf_vs_bn \
        pretrain.eval_every=0                                                # tiny, CPU
    dvc repro ablations/dvc.yaml:compare                    # the demo comparison (CPU)

Each recipe is pretrained by the real pretrain stage into <runs>/<recipe name> (kept when a
finished run with the same settings is there; `--no-run` only measures). Then, besides each run's
metrics.json (train time, peak memory): top-1 on the `train` split with the eval transform (the
train/eval gap is train - val), for BN models top-1 on `val` with batch statistics (BN in train
mode) against running statistics (eval mode), the memory autograd saves per image, and the median
forward+backward time of one micro-batch (models interleaved; --timing-repeats 0 skips it).
Writes <out>/nf_vs_bn.csv, .json and .png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.ablation.nf_vs_bn import COMPARE_FIELDS, compare, write_compare
from pipeline.ablation.runs import run_pretrain
from pipeline.recipe import RecipeError, load_recipe

# the script knows the repository's layout; the library is told where the stage is
PRETRAIN = Path(__file__).resolve().parents[1] / "stages" / "pretrain.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", required=True, help="the recipes to compare")
    ap.add_argument("--shards", required=True, help="shard folder with train and val splits")
    ap.add_argument("--runs", type=Path, required=True, help="run folders go here")
    ap.add_argument("--out", type=Path, required=True, help="report folder")
    ap.add_argument("--launcher", default="python", help="what runs stages/pretrain.py")
    ap.add_argument("--no-run", action="store_true", help="only measure the runs under --runs")
    ap.add_argument("--weights", default="ema", choices=["ema", "raw"])
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--title", default="")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="recipe overrides for every run, e.g. pretrain.epochs=90")
    args = ap.parse_intermixed_args(argv)
    try:
        names = [load_recipe(r, args.overrides).name for r in args.recipes]
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [args.runs / n for n in names]
    for recipe, run in zip(args.recipes, runs, strict=True):
        if not args.no_run:
            run_pretrain(args.launcher, PRETRAIN, recipe, args.shards, run, list(args.overrides))
        if not (run / "model" / "config.json").is_file():
            print(f"error: {run} has no model/ (its pretrain run did not finish)", file=sys.stderr)
            return 1
    rows = compare(runs, args.shards, args.weights, args.timing_repeats)
    write_compare(rows, args.out, args.title or "NF vs BN at equal budget: "
                  + " vs ".join(r["model"] for r in rows))
    for k in COMPARE_FIELDS:
        print(f"{k:>30}: " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float)
                                         else str(r.get(k)) for r in rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
