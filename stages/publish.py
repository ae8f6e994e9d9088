"""Publish a trained model: safetensors weights, timm config.json and a model card, to a folder
and optionally to the Hugging Face Hub.

    python stages/publish.py --recipe recipes/f0.yaml --model runs/finetune-f0/model \
        --metrics runs/evaluate-f0/metrics.json --out publish/nfnet-f0 --repo my-org/nfnet-f0
    python stages/publish.py --recipe recipes/demo.yaml --model runs/finetune/model \
        --metrics runs/evaluate/metrics.json --out publish/demo                 # tiny, local folder

The folder loads with `timm.create_model("local-dir:<out>", pretrained=True)`. With `--repo` (or
publish.repo in the recipe) it is uploaded with huggingface_hub; the token comes from HF_TOKEN or
`huggingface-cli login` and is never printed or written. Without network the stage says so and
leaves the local folder complete (exit code 3).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline.cli import fail, load_recipe_or_exit, stage_parser  # noqa: E402
from pipeline.hub import PublishError, export_folder, push  # noqa: E402
from pipeline.recipe import resolved_text  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument("--model", type=Path, required=True, help="model folder (runs/finetune/model)")
    ap.add_argument("--metrics", type=Path, help="the evaluate stage's metrics.json")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (the local hub copy)")
    ap.add_argument("--repo", help="Hub repo org/name to push to (default: publish.repo)")
    ap.add_argument("--force", action="store_true", help="replace a different model at --out / --repo")
    ap.add_argument("--no-metrics-ok", action="store_true",
                    help="publish without evaluation metrics (publish.require_metrics=false does the same)")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.publish

    metrics = None
    if args.metrics is not None:
        if not args.metrics.is_file():
            fail(f"--metrics {args.metrics} not found: run the evaluate stage first")
        metrics = json.loads(args.metrics.read_text())
    elif section.require_metrics and not args.no_metrics_ok:
        fail("no evaluation metrics: pass --metrics runs/evaluate/metrics.json (run the evaluate "
             "stage first), or --no-metrics-ok to publish without them")

    try:
        config = ckpt.read_model_config(args.model)
    except ckpt.CheckpointError as e:
        fail(str(e))
    lineage = config.get("nfnet_pipeline", {})
    recipe_files = {"finetune": args.model.parent / "recipe.resolved.yaml"}
    if lineage.get("init") and not lineage["init"].startswith(("none:", "timm:")):
        recipe_files = {"pretrain": Path(lineage["init"]).parent / "recipe.resolved.yaml",
                        **recipe_files}
    try:
        publish_yaml = resolved_text(recipe, "publish", {"model": str(args.model)}, args.overrides)
        folder = export_folder(args.model, args.out, section, metrics, recipe_files, args.force,
                               {"recipes/publish.resolved.yaml": publish_yaml})
    except (PublishError, ckpt.CheckpointError) as e:
        fail(str(e))
    print(f"[publish] wrote {folder} (load it with timm.create_model('local-dir:{folder}', "
          f"pretrained=True))")

    repo = args.repo or section.repo
    if repo:
        try:
            url = push(folder, section, repo, force=args.force)
        except PublishError as e:
            print(f"[publish] {e}", file=sys.stderr)
            return 3
        print(f"[publish] pushed to {repo}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
