r"""The AGC sweep: one pretrain run per (clip factor, global batch), then the table and the plot.

    python ablations/agc_sweep.py --recipe recipes/f0.yaml --shards /data/shards/imagenet \
        --runs runs/agc-f0 --out reports/agc-f0 --global-batches 1024 2048 4096 \
        --launcher 'accelerate launch --multi_gpu --num_processes 8' \
        -- pretrain.epochs=90 pretrain.nan_policy=skip                       # full scale
    python ablations/agc_sweep.py --recipe recipes/demo.yaml --shards ablations/data/shards \
        --runs ablations/runs/agc --out reports/agc --clip-factors 0.01 0.02 0.04 0.08 0.16 null \
        --global-batches 16 64 256 -- pretrain.lr_base=0.8 pretrain.epochs=8   # tiny, CPU
    dvc repro ablations/dvc.yaml:agc                        # the demo sweep (ablations/params.yaml)

Each cell runs the real pretrain stage (`--launcher` in front) with `pretrain.clip_factor` and
`pretrain.global_batch` set, plus the trailing dotted overrides; the lr scales with the batch as
the recipe says. A cell whose folder already holds a finished run with the same recipe, shards and
overrides is kept, so an interrupted or extended sweep only runs what is missing (an unfinished
cell resumes from its last checkpoint). `null` (or `off`) is no clipping. `--no-run` only collects
what is there. Writes <out>/agc_sweep.csv, agc_sweep.json, agc_sweep_dvc.csv (one top-1 column per
clip factor, for `dvc plots`) and agc_sweep.png, and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.ablation.agc_sweep import (
    cell_dir,
    cell_overrides,
    clip_label,
    collect_agc,
    parse_clip,
    write_agc,
)
from pipeline.ablation.runs import run_pretrain
from pipeline.recipe import RecipeError, load_recipe

# the script knows the repository's layout; the library is told where the stage is
PRETRAIN = Path(__file__).resolve().parents[1] / "stages" / "pretrain.py"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="the NFNet recipe every cell starts from")
    ap.add_argument("--shards", required=True, help="shard folder with train and val splits")
    ap.add_argument("--runs", type=Path, required=True, help="one run folder per cell goes here")
    ap.add_argument("--out", type=Path, required=True, help="report folder")
    ap.add_argument("--clip-factors", nargs="+",
                    default=["0.01", "0.02", "0.04", "0.08", "0.16", "null"])
    ap.add_argument("--global-batches", nargs="+", type=int, required=True)
    ap.add_argument("--launcher", default="python", help="what runs stages/pretrain.py")
    ap.add_argument("--no-run", action="store_true", help="only collect the runs under --runs")
    ap.add_argument("--title", default="")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="recipe overrides for every cell, e.g. pretrain.epochs=8")
    args = ap.parse_intermixed_args(argv)
    try:
        clips = [parse_clip(c) for c in args.clip_factors]
        cells = [(c, b) for c in clips for b in args.global_batches]
        for clip, batch in cells:                          # a bad cell fails before any run
            load_recipe(args.recipe, cell_overrides(clip, batch, args.overrides))
    except (ValueError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not args.no_run:
        for clip, batch in cells:
            run_pretrain(args.launcher, PRETRAIN, args.recipe, args.shards,
                         cell_dir(args.runs, clip, batch),
                         cell_overrides(clip, batch, args.overrides))
    runs = [cell_dir(args.runs, c, b) for c, b in cells]
    found = [r for r in runs if (r / "recipe.resolved.yaml").is_file()]
    if not found:
        print(f"error: no runs under {args.runs}", file=sys.stderr)
        return 2
    rows = collect_agc(found)
    title = args.title or (f"AGC sweep: {Path(args.recipe).stem}, {len(rows)} pretrain runs, "
                           f"{' '.join(args.overrides)}")
    paths = write_agc(rows, args.out, title)
    print(f"{'clip':>6} {'batch':>6} {'lr':>7} {'steps':>6} {'top1':>6} {'loss':>8} status")
    nan = float("nan")
    for r in rows:
        print(f"{clip_label(r['clip_factor']):>6} {r['global_batch']:>6} {r['lr'] or 0:7.3f} "
              f"{r['steps'] or 0:>6} {nan if r['val_top1'] is None else r['val_top1']:6.1f} "
              f"{nan if r['train_loss'] is None else r['train_loss']:8.4f} {r['status']}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
