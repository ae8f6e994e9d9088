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

from pipeline import checkpoint as ckpt
from pipeline import runtime, train
from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.lineage import data_lineage
from pipeline.preemption import hold_stop_signals, stage_exit
from pipeline.recipe import write_resolved
from pipeline.train_cli import add_training_args, plan_or_exit, train_and_finish, training_data
from pipeline.transfer import (
    build_finetune_model,
    finetune_lineage,
    init_crop_mode,
    load_init,
    resolution_note,
)


def main(argv: list[str] | None = None) -> int:
    with hold_stop_signals():            # a scheduler's stop during start-up is kept, not fatal
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--init", required=True,
                    help="pretrained model folder, published folder, timm:<arch>=<file>, "
                         "hf-hub:<org>/<name>, dm:<file.npz>, or none:<variant>")
    add_training_args(ap, "finetune")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.finetune

    class_names, num_samples = training_data(args, section, "finetune")

    try:
        src = load_init(args.init, section.init.weights, section.seed)
        model, messages = build_finetune_model(src, class_names, section)
    except (ckpt.CheckpointError, KeyError, ValueError) as e:
        fail(f"--init {args.init}: {e}")
    init_config = src.config
    note = resolution_note(init_config, section)
    messages += [note] if note else []
    lineage = finetune_lineage(init_config, args.init, src.weights_label, recipe.name)
    config = ckpt.model_config(model, init_config["architecture"], init_config.get("model_args", {}),
                               class_names, section.train_res, section.test_res, section.crop_pct,
                               section.augment.interpolation, lineage,
                               init_crop_mode(init_config))
    plan = plan_or_exit(args, section, "finetune", num_samples, model, config)

    if runtime.is_main_process():
        for m in messages:
            print(f"[finetune] {m}")
    job = train.Job("finetune", section, model, args.shards, args.out, config, resume=args.resume,
                    init_fingerprint=src.fingerprint, record_keys=args.log_samples,
                    shard_url=args.shard_url)
    # written once the output folder is this run's (its lock, a run to continue or start)
    return train_and_finish(job, plan, args, lambda: write_resolved(
        recipe, "finetune", args.out,
        {**plan.as_dict(), "init": args.init, **data_lineage(args.shards, args.shard_url)},
        args.overrides))


if __name__ == "__main__":
    stage_exit(main)
