"""Evaluate a trained model on a held-out split at its test resolution: DVC metrics and plots.

    accelerate launch --num_processes 8 stages/evaluate.py --recipe recipes/f0.yaml \
        --model runs/finetune-f0/model --shards /data/shards/imagenet --split val --out runs/evaluate-f0
    python stages/evaluate.py --recipe recipes/demo.yaml --model runs/finetune/model \
        --shards data/shards/finetune --out runs/evaluate                            # tiny, CPU

Test resolution, crop fraction and interpolation travel with the model's config.json; the recipe's
`evaluate` section may override them. Writes `<out>/metrics.json` (top-1, top-5, NLL, ECE, img/s;
EMA and raw weights when both exist), `<out>/plots/` (per-class accuracy, confusion matrix,
calibration: CSV for `dvc plots`, PNG to look at) and prints a short table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline.cli import fail, load_recipe_or_exit, stage_parser  # noqa: E402
from pipeline.data.manifest import ManifestError, load_split  # noqa: E402
from pipeline.evaluate import validate, write_plots  # noqa: E402
from pipeline.recipe import atomic_write_text, write_resolved  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--model", type=Path, required=True, help="model folder (runs/finetune/model)")
    ap.add_argument("--shards", type=Path, required=True, help="shard folder with _info.json")
    ap.add_argument("--split", default="val", help="split to evaluate (default: val)")
    ap.add_argument("--out", type=Path, default=Path("runs/evaluate"), help="output folder")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.evaluate
    try:
        split = load_split(args.shards, args.split)
        config = ckpt.read_model_config(args.model)
    except (ManifestError, ckpt.CheckpointError) as e:
        fail(str(e))
    names = config.get("label_names") or []
    if split.class_names and names and list(split.class_names) != list(names):
        fail(f"the model's classes {names[:5]}... differ from the shards' {list(split.class_names)[:5]}...: "
             f"evaluate on the label set the model was trained on")

    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      mixed_precision="bf16" if torch.cuda.is_available() else "no")
    models = {}
    for w in section.weights:
        try:
            models[w] = ckpt.load_model_dir(args.model, w, device=acc.device)[0]
        except ckpt.CheckpointError as e:
            if acc.is_main_process:
                print(f"[evaluate] skipping {w} weights: {e}")
    if not models:
        fail(f"{args.model}: none of the weights {section.weights} could be loaded")
    for cfg_key, value in (("test_res", section.test_res), ("crop_pct", section.crop_pct),
                           ("interpolation", section.interpolation)):
        if value is not None:
            pc = config["pretrained_cfg"]
            if cfg_key == "test_res":
                pc["test_input_size"] = [3, value, value]
            elif cfg_key == "crop_pct":
                pc["test_crop_pct"] = value
            else:
                pc["interpolation"] = value
    results = validate(models, split, config, batch=section.batch, workers=section.num_workers,
                       device=acc.device, rank=acc.process_index, world=acc.num_processes,
                       autocast=acc.autocast, bins=section.calibration_bins)
    if not acc.is_main_process:
        return 0
    primary = "ema" if "ema" in results else next(iter(results))
    p = results[primary]
    metrics = {"weights": primary, "split": args.split, "num_samples": p["num_samples"],
               "top1": p["top1"], "top5": p["top5"], "nll": p["nll"], "ece": p["ece"],
               "img_per_s": p["img_per_s"], "test_res": p["test_res"], "crop_pct": p["crop_pct"],
               "interpolation": p["interpolation"]}
    for name, r in results.items():
        if name != primary:
            metrics[name] = {k: r[k] for k in ("top1", "top5", "nll", "ece")}
    write_resolved(recipe, "evaluate", args.out, {"model": str(args.model), "split": args.split})
    atomic_write_text(args.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_plots(args.out / "plots", p, names or [str(i) for i in range(config["num_classes"])])
    print(f"{'weights':>8} {'top1':>7} {'top5':>7} {'nll':>7} {'ece':>7}  ({p['num_samples']} "
          f"samples, {p['test_res']} px, crop {p['crop_pct']:.3f})")
    for name, r in results.items():
        print(f"{name:>8} {r['top1']:7.2f} {r['top5']:7.2f} {r['nll']:7.4f} {r['ece']:7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
