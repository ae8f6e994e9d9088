r"""Fine-tune a pretrained NFNet on a labelled set at a higher resolution, with a new head.

    accelerate launch --multi_gpu --num_processes 8 stages/finetune.py --recipe recipes/f4plus.yaml \
        --init runs/pretrain-f4plus/model --shards /data/shards/imagenet --out runs/finetune-f4plus
    python stages/finetune.py --recipe recipes/demo.yaml --init runs/pretrain/model \
        --shards data/shards/finetune --out runs/finetune finetune.epochs=1      # tiny, CPU
    python stages/finetune.py --recipe recipes/demo.yaml --init none:tiny \
        --shards data/shards/finetune --out runs/scratch            # from scratch, same budget

`--init` is one of
  runs/pretrain/model            a pretrain/finetune model folder: EMA weights, or raw ones with
                                 finetune.init.weights=raw
  publish/demo                   a folder from the publish stage: its one set of weights
  timm:<arch>=<file.safetensors> any timm architecture with local weights (no download)
  hf-hub:<org>/<name>            a timm model on the Hugging Face Hub, e.g. DeepMind's F0 as timm
                                 ships it: hf-hub:timm/dm_nfnet_f0.dm_in1k (cached; offline from
                                 the cache with HF_HUB_OFFLINE=1)
  dm:<F0_haiku.npz>              DeepMind's own released checkpoint
  none:<variant>                 random weights: the from-scratch baseline with the same budget
The head is kept when the target has the pretrained label set, otherwise replaced by a new one
(finetune.init.head_init, zeros by default); finetune.init.freeze=[stem,stages.0] freezes modules.
Trains at finetune.train_res (the paper's transfer raises it above the pretraining resolution)
and writes the same outputs as the pretrain stage: model/ (config.json carries test resolution,
crop and interpolation to the evaluate stage), checkpoints/, metrics.json, recipe.resolved.yaml.
"""
from __future__ import annotations

import argparse

from pipeline.cli import fail
from pipeline.model_config import ModelConfig, ModelError
from pipeline.preemption import stage_exit
from pipeline.recipe import Recipe, TrainSection
from pipeline.train_cli import Built, training_stage
from pipeline.transfer import (
    build_finetune_model,
    finetune_lineage,
    load_init,
    resolution_note,
)


def add_init(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--init", required=True,
                    help="pretrained model folder, published folder, timm:<arch>=<file>, "
                         "hf-hub:<org>/<name>, dm:<file.npz>, or none:<variant>")


def build(args: argparse.Namespace, recipe: Recipe, section: TrainSection,
          class_names: list[str]) -> Built:
    """The `--init` model with a head for these classes, its config.json and lineage."""
    try:
        src = load_init(args.init, section.init.weights, section.seed)
        model, messages = build_finetune_model(src, class_names, section)
    except (ModelError, KeyError, ValueError) as e:
        fail(f"--init {args.init}: {e}")
    init_config = src.config
    note = resolution_note(init_config, section)
    lineage = finetune_lineage(init_config, args.init, src.weights_label, recipe.name)
    config = ModelConfig.for_training(
        model, architecture=init_config.architecture, model_args=init_config.model_args,
        class_names=class_names, train_res=section.train_res, test_res=section.test_res,
        # evaluated as the init was (an init without a crop mode: model_config.py's default,
        # as the evaluate stage reads it; a from-scratch init states its variant's)
        crop_pct=section.crop_pct, crop_mode=init_config.pretrained_cfg.crop_mode,
        interpolation=section.augment.interpolation, lineage=lineage)
    return Built(model, config, src.fingerprint, messages + ([note] if note else []),
                 {"init": args.init})


def main(argv: list[str] | None = None) -> int:
    return training_stage("finetune", __doc__, build, argv, more_args=add_init)


if __name__ == "__main__":
    stage_exit(main)
