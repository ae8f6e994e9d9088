r"""Pretrain an NFNet on webdataset shards.

    accelerate launch --multi_gpu --num_processes 8 stages/pretrain.py --recipe recipes/f0.yaml \
        --shards /data/shards/imagenet --out runs/pretrain-f0          # full scale, 8 GPUs
    python stages/pretrain.py --recipe recipes/demo.yaml --shards data/shards/pretrain \
        --out runs/pretrain pretrain.epochs=1                          # tiny, CPU, ~1 minute
    python stages/pretrain.py --recipe recipes/f0.yaml --dry-run       # the plan, no shards needed

Reads `<shards>/_info.json` and its `train` (and, if present, `val`) split. Writes
`<out>/model/` (weights + config.json for the next stage), `<out>/checkpoints/` (resumable),
`<out>/metrics.json`, `<out>/recipe.resolved.yaml` and training curves under `<out>/dvclive/`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline import train  # noqa: E402
from pipeline.cli import fail, load_recipe_or_exit, stage_parser  # noqa: E402
from pipeline.data.manifest import (ManifestError, load_split, manifest_path,  # noqa: E402
                                     read_manifest, sha256_file)
from pipeline.recipe import write_resolved  # noqa: E402
from pipeline.variants import build_model, get_variant  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--shards", type=Path, help="shard folder with _info.json (train split)")
    ap.add_argument("--shard-url", metavar="TEMPLATE",
                    help="read the tars from object storage / HTTP, e.g. "
                         "'pipe:aws s3 cp s3://bucket/shards/{name} -' (manifest from --shards)")
    ap.add_argument("--out", type=Path, default=Path("runs/pretrain"), help="output folder")
    ap.add_argument("--resume", default="auto",
                    help="auto (newest complete checkpoint of this recipe), none, or a checkpoint folder")
    ap.add_argument("--dry-run", nargs="?", const="text", choices=["text", "json"],
                    help="print the resolved plan and exit (no training, shards optional)")
    ap.add_argument("--log-samples", type=Path, metavar="DIR",
                    help="write the sample keys each process trains on to DIR/rank<N>.jsonl (audits)")
    ap.add_argument("--processes", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                    help="processes to plan for with --dry-run (default: this launch)")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.pretrain
    try:
        variant = get_variant(section.model.variant)
    except KeyError as e:
        fail(f"{args.recipe}: pretrain.model.variant: {e.args[0]}")

    if args.shards is not None:
        try:
            info = read_manifest(args.shards)
            split = load_split(args.shards, "train", args.shard_url)
        except ManifestError as e:
            fail(str(e))
        class_names = list(info.get("class_names") or range(split.num_classes))
        num_samples = split.num_samples
    elif args.dry_run:
        if section.expected_samples is None:
            fail("--dry-run without --shards needs pretrain.expected_samples in the recipe")
        class_names, num_samples = [str(i) for i in range(1000)], section.expected_samples
    else:
        fail("--shards is required (the output folder of the shard stage)")

    model, arch, model_args = build_model(variant.name, len(class_names), section.model.drop_rate,
                                          section.model.drop_path_rate, section.model.width,
                                          device="meta" if args.dry_run else None,
                                          seed=section.seed)
    crop_pct = section.crop_pct or section.test_res / (section.test_res + 32)
    config = ckpt.model_config(model, arch, model_args, [str(c) for c in class_names],
                               section.train_res, section.test_res, crop_pct,
                               section.augment.interpolation,
                               {"variant": variant.name, "width": section.model.width,
                                "recipe": recipe.name})
    try:
        plan = train.make_plan(section, num_samples, args.processes if args.dry_run else
                               int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as e:
        fail(f"{args.recipe}: pretrain: {e}")
    if args.dry_run:
        print(train.dry_run_report(plan, section, model, config, args.dry_run))
        return 0

    write_resolved(recipe, "pretrain", args.out,
                   {**plan.as_dict(), "shards": str(args.shards), "shard_url": args.shard_url,
                    "manifest_sha256": sha256_file(manifest_path(args.shards))}, args.overrides)
    job = train.Job("pretrain", section, model, args.shards, args.out, config, resume=args.resume,
                    record_keys=args.log_samples, shard_url=args.shard_url)
    try:
        result = train.run(job)
    except train.NonFiniteLoss as e:
        fail(str(e), code=1)
    train.finish(result, job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
