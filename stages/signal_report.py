r"""Signal propagation report: block-output statistics of a model at initialisation, NF vs BN.

    python stages/signal_report.py --recipe recipes/f0.yaml --baseline recipes/resnet50.yaml \
        --shards /data/shards/imagenet --out reports/signal-f0 --images 64     # full scale
    python stages/signal_report.py --recipe recipes/demo.yaml --baseline recipes/demo_bn.yaml \
        --shards data/shards/pretrain --out reports/signal                     # tiny, CPU, seconds

Builds `pretrain.model.variant` of each recipe exactly as the pretrain stage does (same seed, so
the same initial weights), takes the first `--images` images of `--split` from the shards at the
recipe's `pretrain.train_res` (eval transform), and records for every residual block's output the
average channel squared mean and average channel variance (DeepMind's `signal_metrics`). Curves:
real images with the residual branches on (NF skip gains / last BN gamma set to 1: the NF-ResNet
paper's analysis; as built they are zero and blocks start as identities), the same as built, and
N(0,1) inputs with branches on (the idealised input of the NF design). Dotted overrides apply to
--recipe. Writes <out>/signal.json, signal.csv, signal.png and recipe.resolved.yaml.

(Not `stages/signal.py`: Python puts stages/ first on every stage script's path, and a file named
signal.py there would shadow the standard library's `signal` for all of them.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.data.manifest import ManifestError, read_manifest
from pipeline.recipe import RecipeError, load_recipe, write_resolved
from pipeline.signal_propagation import gaussian_like, image_batch, measure, summarise, write_report
from pipeline.variants import build_model, get_variant


def _curves(recipe, shards: Path, split: str, count: int, num_classes: int, device: str):
    section = recipe.pretrain
    variant = get_variant(section.model.variant)
    # as the pretrain stage builds it (its seed: the same initial weights), minus dropout and
    # stochastic depth, which the report runs without
    model, arch, _ = build_model(variant.name, num_classes, 0.0, 0.0, section.model.width,
                                 device=device, seed=section.seed)
    crop = section.crop_pct or 1.0
    x, _ = image_batch(shards, split, count, section.train_res, crop, section.augment.interpolation)
    x = x.to(device)
    label = f"{variant.name} ({'NFNet' if variant.family == 'nfnet' else 'BN'}, {arch})"
    curves = [measure(model, x, label, "images", gains=1.0),
              measure(model, x, label, "images", gains=None),
              measure(model, gaussian_like(x, section.seed), label, "gaussian", gains=1.0)]
    return curves, {"variant": variant.name, "architecture": arch, "res": section.train_res,
                    "images": int(x.shape[0]), "seed": section.seed}


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--baseline",
                    help="a second recipe drawn beside the first (e.g. the BN baseline)")
    ap.add_argument("--shards", type=Path, required=True, help="shard folder with _info.json")
    ap.add_argument("--split", default="train",
                    help="split to take the images from (default: train)")
    ap.add_argument("--images", type=int, default=64, help="batch size of the probe (default: 64)")
    ap.add_argument("--out", type=Path, default=Path("reports/signal"), help="output folder")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    try:
        baseline = load_recipe(args.baseline) if args.baseline else None
    except RecipeError as e:
        fail(str(e))
    for r in (recipe, baseline):
        try:
            r is not None and get_variant(r.pretrain.model.variant)
        except KeyError as e:
            fail(f"{r.source}: pretrain.model.variant: {e.args[0]}")
    if args.images < 2:
        fail(f"--images {args.images}: statistics over a batch need at least 2 images")
    try:
        info = read_manifest(args.shards)
        if args.split not in info["splits"]:
            fail(f"{args.shards} has no split '{args.split}' (it has {', '.join(info['splits'])})")
        num_classes = len(info.get("class_names") or []) or 1000
    except ManifestError as e:
        fail(str(e))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    curves, models = [], []
    for r in (recipe, baseline):
        if r is None:
            continue
        c, facts = _curves(r, args.shards, args.split, args.images, num_classes, device)
        curves += c
        models.append({"recipe": r.source, **facts})
    title = "Signal propagation at initialisation: " + " vs ".join(
        f"{m['variant']} ({m['images']} images at {m['res']} px)" for m in models)
    meta = {"title": title, "shards": str(args.shards), "split": args.split, "models": models,
            "metrics": "avg_sq_mean = mean_c (mean_NHW x)^2; avg_var = mean_c var_NHW x "
                       "(DeepMind's signal_metrics), at each residual block's output",
            "branches": "on = NF skip gains / last BN gamma set to 1; "
                        "as built = 0 (identity blocks)"}
    paths = write_report(curves, args.out, meta)
    write_resolved(recipe, "pretrain", args.out, {"signal": meta["models"], "split": args.split,
                                                  "baseline": args.baseline}, args.overrides)
    for c in curves:
        if c.branches != "on":
            continue
        print(f"{c.model}, {c.input}, branches on:")
        for s, st in summarise(c).items():
            print(f"  stage {s}: transition var {st['transition_var']:.4g}, mean increment per "
                  f"block {st['mean_increment']:.4g}"
                  + (f" (NF design: 1 + alpha^2 = {1 + c.alpha ** 2:.4g}, alpha^2 = "
                     f"{c.alpha ** 2:.4g})" if c.alpha else ""))
    print(f"wrote {paths['png']}, {paths['csv']}, {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
