r"""Evaluate a trained model on a held-out split at its test resolution: DVC metrics and plots.

    accelerate launch --num_processes 8 stages/evaluate.py --recipe recipes/f0.yaml \
        --model runs/finetune-f0/model --shards /data/shards/imagenet --split val --out runs/evaluate-f0
    python stages/evaluate.py --recipe recipes/demo.yaml --model runs/finetune/model \
        --shards data/shards/finetune --out runs/evaluate                            # tiny, CPU

Test resolution, crop fraction, crop mode, interpolation and mean/std travel with the model's
config.json (as timm's `resolve_data_config(..., use_test_size=True)` reads them); the recipe's
`evaluate` section may override resolution, crop and interpolation. The weights in
`evaluate.weights` that the folder has are evaluated (EMA and raw after training; a published
folder's one set is reported as `published`). On any number of processes every validation sample
is predicted exactly once (the count is checked). Writes
    <out>/metrics.json         top-1, top-5, NLL, ECE, img/s of the first weights (EMA when there
                               is one), the same for the others under their name (DVC metrics);
                               under `scored`, what was measured: the sha256 of each weights file,
                               the class names, the test settings, the split and the shard
                               manifest's sha256 (the publish stage checks them against the model)
    <out>/plots/               per_class.csv, confusion.csv, calibration.csv (`dvc plots`) and
                               evaluation.png; per_class_top1 and the confusion matrix in details.json
and prints a short table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import runtime
from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.data.manifest import ManifestError, load_split
from pipeline.evaluate import load_models, validate, write_plots
from pipeline.files import atomic_write_text, sha256_file
from pipeline.lineage import data_lineage
from pipeline.model_config import ModelConfig, ModelError
from pipeline.model_dir import model_weights
from pipeline.recipe import write_resolved

SUMMARY = ("top1", "top5", "nll", "ece", "img_per_s", "forward_img_per_s")


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--model", type=Path, required=True,
                    help="model folder (runs/finetune/model) or a published folder")
    ap.add_argument("--shards", type=Path, required=True, help="shard folder with _info.json")
    ap.add_argument("--split", default="val", help="split to evaluate (default: val)")
    ap.add_argument("--out", type=Path, default=Path("runs/evaluate"), help="output folder")
    ap.add_argument("--shard-url", metavar="TEMPLATE",
                    help="read the tars from object storage / HTTP, e.g. "
                         "'pipe:aws s3 cp s3://bucket/shards/{name} -' (manifest from --shards)")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.evaluate
    try:
        split = load_split(args.shards, args.split, args.shard_url)
        config = ModelConfig.load(args.model)
    except (ManifestError, ModelError) as e:
        fail(str(e))
    args.split = split.name          # as the manifest names it ("val" may have found "validation")
    names = config.class_names
    if split.class_names and config.label_names and list(split.class_names) != names:
        fail(f"the model's classes {names[:5]} differ from the shards' {list(split.class_names)[:5]} "
             f"({args.shards}): evaluate on the label set the model was trained on")
    if split.num_classes > len(names):
        fail(f"the shards have {split.num_classes} classes, the model {len(names)}: evaluate on "
             f"the label set the model was trained on")

    acc = runtime.make_accelerator("auto")
    # hashed before loading, so the record names the bytes that were evaluated
    shas = _weights_shas(args.model, section.weights) if acc.is_main_process else {}
    try:
        models, config, messages = load_models(args.model, section.weights, acc.device)
    except ModelError as e:
        fail(str(e))
    for m in messages if acc.is_main_process else []:
        print(f"[evaluate] {m}")
    if not models:
        fail(f"{args.model}: none of the weights {section.weights} (evaluate.weights) are there")
    try:
        results = validate(models, split, config, batch=section.batch,
                           workers=section.num_workers, device=acc.device,
                           rank=acc.process_index, world=acc.num_processes,
                           autocast=acc.autocast, bins=section.calibration_bins,
                           test_res=section.test_res, crop_pct=section.crop_pct,
                           interpolation=section.interpolation, compile=section.compile)
    except (ValueError, RuntimeError) as e:
        fail(f"{args.model} on {args.shards} ({args.split}): {e}")
    if acc.is_main_process:
        write_outputs(args, recipe, results, names, shas)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def _weights_shas(model: Path, wanted: list[str]) -> dict[str, dict[str, str]]:
    """{label: {"file", "sha256"}} of the weights files `load_models` picks for `wanted` (labels
    ema / raw, or `published` for a published folder's one file)."""
    shas = {}
    for w in wanted:
        try:
            path, label, _ = model_weights(model, w)
        except ModelError:
            continue                    # load_models skips it too, with a message
        if label not in shas:
            shas[label] = {"file": str(path), "sha256": sha256_file(path)}
    return shas


def _scored_record(args, p: dict, names: list[str], shas: dict[str, dict[str, str]]) -> dict:
    """What the figures were measured on: the model's weights files (sha256), classes and test
    settings, and the data (split, shard manifest sha256). The publish stage refuses metrics whose
    record does not match the model it publishes."""
    return {"model": str(args.model), "weights": shas, "class_names": names,
            **{k: p[k] for k in ("test_res", "crop_pct", "crop_mode", "interpolation")},
            "split": args.split, **data_lineage(args.shards, args.shard_url)}


def write_outputs(args, recipe, results: dict[str, dict], names: list[str],
                  shas: dict[str, dict[str, str]]) -> None:
    primary = "ema" if "ema" in results else next(iter(results))
    p = results[primary]
    metrics = {"weights": primary, "split": args.split, "num_samples": p["num_samples"],
               **{k: p[k] for k in SUMMARY},
               **{k: p[k] for k in ("test_res", "crop_pct", "crop_mode", "interpolation")}}
    for name, r in results.items():
        if name != primary:
            metrics[name] = {k: r[k] for k in SUMMARY}
    # A one-item list: `dvc metrics show` makes a column of every string under a dict (shas,
    # paths) but skips lists, so the table keeps to the figures while the file holds the record.
    metrics["scored"] = [_scored_record(args, p, names, shas)]
    write_resolved(recipe, "evaluate", args.out, {"model": str(args.model), "split": args.split,
                                                  "weights": list(results),
                                                  "test_res": p["test_res"],
                                                  "crop_pct": p["crop_pct"],
                                                  "interpolation": p["interpolation"]},
                   args.overrides)
    details = {name: {k: r[k] for k in ("per_class_top1", "confusion", "calibration")}
               for name, r in results.items()}
    write_plots(args.out / "plots", p, names)
    atomic_write_text(args.out / "plots" / "details.json", json.dumps(details) + "\n")
    atomic_write_text(args.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"{p['num_samples']} samples of '{args.split}' at {p['test_res']} px, crop "
          f"{p['crop_pct']:.3f} ({p['crop_mode']}), {p['interpolation']}")
    print(f"{'weights':>10} {'top1':>7} {'top5':>7} {'nll':>7} {'ece':>7} {'img/s':>8}")
    for name, r in results.items():
        print(f"{name:>10} {r['top1']:7.2f} {r['top5']:7.2f} {r['nll']:7.4f} {r['ece']:7.4f} "
              f"{r['img_per_s']:8.1f}")


if __name__ == "__main__":
    sys.exit(main())
