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

import argparse

from pipeline.cli import fail
from pipeline.model_config import ModelConfig
from pipeline.preemption import stage_exit
from pipeline.recipe import Recipe, TrainSection
from pipeline.train_cli import Built, training_stage
from pipeline.variants import build_model, get_variant


def build(args: argparse.Namespace, recipe: Recipe, section: TrainSection,
          class_names: list[str]) -> Built:
    """A new NFNet (or BN baseline) of the recipe's variant, with its config.json."""
    try:
        variant = get_variant(section.model.variant)
    except KeyError as e:
        fail(f"{args.recipe}: pretrain.model.variant: {e.args[0]}")
    model, arch, model_args = build_model(variant.name, len(class_names), section.model.drop_rate,
                                          section.model.drop_path_rate, section.model.width,
                                          device="meta" if args.dry_run else None,
                                          seed=section.seed)
    config = ModelConfig.for_training(
        model, architecture=arch, model_args=model_args, class_names=class_names,
        train_res=section.train_res, test_res=section.test_res, crop_pct=section.crop_pct,
        crop_mode=variant.crop_mode, interpolation=section.augment.interpolation,
        lineage={"variant": variant.name, "width": section.model.width, "recipe": recipe.name})
    return Built(model, config)


def main(argv: list[str] | None = None) -> int:
    return training_stage("pretrain", __doc__, build, argv)


if __name__ == "__main__":
    stage_exit(main)
