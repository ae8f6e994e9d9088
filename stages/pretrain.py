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

from pipeline import checkpoint as ckpt
from pipeline import train
from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.lineage import data_lineage
from pipeline.preemption import hold_stop_signals, stage_exit
from pipeline.recipe import write_resolved
from pipeline.train_cli import add_training_args, plan_or_exit, train_and_finish, training_data
from pipeline.variants import build_model, get_variant


def main(argv: list[str] | None = None) -> int:
    with hold_stop_signals():            # a scheduler's stop during start-up is kept, not fatal
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = stage_parser(__doc__)
    add_training_args(ap, "pretrain")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.pretrain
    try:
        variant = get_variant(section.model.variant)
    except KeyError as e:
        fail(f"{args.recipe}: pretrain.model.variant: {e.args[0]}")

    class_names, num_samples = training_data(args, section, "pretrain")

    model, arch, model_args = build_model(variant.name, len(class_names), section.model.drop_rate,
                                          section.model.drop_path_rate, section.model.width,
                                          device="meta" if args.dry_run else None,
                                          seed=section.seed)
    config = ckpt.model_config(model, arch, model_args, [str(c) for c in class_names],
                               section.train_res, section.test_res, section.crop_pct,
                               section.augment.interpolation,
                               {"variant": variant.name, "width": section.model.width,
                                "recipe": recipe.name}, variant.crop_mode)
    plan = plan_or_exit(args, section, "pretrain", num_samples, model, config)

    job = train.Job("pretrain", section, model, args.shards, args.out, config, resume=args.resume,
                    record_keys=args.log_samples, shard_url=args.shard_url)
    # written once the output folder is this run's (its lock, a run to continue or start)
    return train_and_finish(job, plan, args, lambda: write_resolved(
        recipe, "pretrain", args.out, {**plan.as_dict(), **data_lineage(args.shards, args.shard_url)},
        args.overrides))


if __name__ == "__main__":
    stage_exit(main)
