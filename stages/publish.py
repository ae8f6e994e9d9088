r"""Publish a trained model: safetensors weights, timm config.json and a model card, to a folder
and optionally to the Hugging Face Hub.

    python stages/publish.py --recipe recipes/f0.yaml --model runs/finetune-f0/model \
        --metrics runs/evaluate-f0/metrics.json --out publish/nfnet-f0 --repo my-org/nfnet-f0
    python stages/publish.py --recipe recipes/demo.yaml --model runs/finetune/model \
        --metrics runs/evaluate/metrics.json --out publish/demo                 # tiny, local folder

The folder loads with `timm.create_model("local-dir:<out>", pretrained=True)`. The resolved recipes
are found by following the model folders' `init` links (`runs/<stage>/recipe.resolved.yaml`);
`--pretrain-recipe` names the pre-training one when its run has moved. With `--repo` (or
publish.repo) the folder is uploaded as one commit with huggingface_hub: the repo is created if
needed (`--private`), `--revision` names a branch (created from main if new), and the revision
ends up holding exactly the folder's files. The token comes from HF_TOKEN or `hf auth login` and
is never printed or written.

The metrics must be this model's: the evaluate stage records what it scored (metrics.json
`scored`), and the sha256 of the weights published, config.json's label names and its test
resolution must match that record. Otherwise (or with no record: metrics from before the check)
the stage refuses; `--force` publishes them anyway, with a warning, a card that marks the figures
as not verified, and config.json keeping the model's own test settings.

Exit codes:
    0  the folder is written (and uploaded, with --repo)
    2  refused, with the reason: a bad recipe or input, no evaluation metrics (pass
       --no-metrics-ok to publish without), metrics not measured on this model (re-run evaluate,
       or --force), tensors that do not match the architecture, or a different model at --out
       or --repo (pass --force to replace it). A refusal at --repo
       comes after the local folder is complete; any other leaves --out as it was.
    3  the Hub cannot be reached (offline, HF_HUB_OFFLINE=1, no route to HF_ENDPOINT): nothing
       uploaded, the local folder is complete; run the same command again when online
    4  the Hub answered with an error (no or bad token, no write access): nothing uploaded, the
       local folder is complete
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.export import PublishError, export_folder, metrics_for, weights_to_publish
from pipeline.files import WriteError
from pipeline.hub import push
from pipeline.lineage import (
    evaluation_notes,
    lineage_recipes,
    missing_recipe_notes,
    provenance_problems,
    scored_record,
)
from pipeline.model_config import ModelConfig, ModelError
from pipeline.recipe import PublishSection, resolved_text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.publish
    repo = args.repo or section.repo
    if repo is not None and (repo.count("/") != 1 or not all(repo.split("/"))):
        fail(f"--repo {repo}: write the Hub model repo as org/name")
    metrics = _metrics(args, section)
    try:
        config = ModelConfig.load(args.model)
    except ModelError as e:
        fail(str(e))
    recipe_files = _recipe_files(args, config)
    unchecked = _check_metrics(args, section, config, metrics)
    for note in (missing_recipe_notes(args.model, config, recipe_files)
                 + ([] if unchecked else evaluation_notes(config, metrics))):
        print(f"[publish] note: {note}")

    resolved = {"model": str(args.model), "metrics": str(args.metrics) if args.metrics else None,
                "recipes": {k: str(v) for k, v in recipe_files.items()}, "repo": repo}
    try:
        publish_yaml = resolved_text(recipe, "publish", resolved, args.overrides)
        folder = export_folder(args.model, args.out, section, metrics, recipe_files, args.force,
                               {"recipes/publish.resolved.yaml": publish_yaml}, repo, unchecked)
    except (PublishError, ModelError) as e:
        fail(str(e))
    except WriteError as e:                 # disk full, read-only: one line, nothing half-written
        fail(str(e), 1)
    print(f"[publish] wrote {folder} ({section.weights} weights; load it with "
          f"timm.create_model('local-dir:{folder}', pretrained=True))")
    return _push(args, section, folder, repo) if repo else 0


def _parser() -> argparse.ArgumentParser:
    ap = stage_parser(__doc__)
    ap.add_argument("--model", type=Path, required=True, help="model folder (runs/finetune/model)")
    ap.add_argument("--metrics", type=Path, help="the evaluate stage's metrics.json")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (the local hub copy)")
    ap.add_argument("--pretrain-recipe", type=Path,
                    help="the pre-training run's recipe.resolved.yaml (default: found from the "
                         "model's init link)")
    ap.add_argument("--repo", help="Hub model repo org/name to push to (default: publish.repo)")
    ap.add_argument("--private", action="store_true", default=None,
                    help="create the repo private (default: publish.private; an existing repo "
                         "keeps its visibility)")
    ap.add_argument("--revision", help="branch to push to (default: publish.revision, else main)")
    ap.add_argument("--commit-message", help="commit message (default: publish.commit_message)")
    ap.add_argument("--force", action="store_true",
                    help="replace a different model at --out / --repo; publish metrics that "
                         "cannot be tied to this model (with a warning)")
    ap.add_argument("--no-metrics-ok", action="store_true",
                    help="publish without evaluation metrics (publish.require_metrics=false too)")
    return ap


def _metrics(args: argparse.Namespace, section: PublishSection) -> dict[str, Any] | None:
    """The evaluate stage's figures for the weights being published; exits 2 when there are none
    and the recipe requires them."""
    if args.metrics is not None:
        if not args.metrics.is_file():
            fail(f"--metrics {args.metrics} not found: run the evaluate stage first")
        try:
            return metrics_for(json.loads(args.metrics.read_text()), section.weights, args.metrics)
        except (json.JSONDecodeError, PublishError) as e:
            fail(f"--metrics {args.metrics}: {e}")
    if section.require_metrics and not args.no_metrics_ok:
        fail("no evaluation metrics: pass --metrics runs/evaluate/metrics.json (run the evaluate "
             "stage first), or --no-metrics-ok to publish without them")
    return None


def _check_metrics(args: argparse.Namespace, section: PublishSection, config: ModelConfig,
                   metrics: dict[str, Any] | None) -> list[str]:
    """Why the metrics cannot be tied to the weights being published ([] when they can): exits 2
    unless --force, which warns and goes on."""
    if metrics is None:
        return []
    try:
        weights = weights_to_publish(args.model, section.weights)
    except ModelError as e:
        fail(str(e))
    problems = provenance_problems(config, metrics, weights, section.weights)
    if not problems:
        return []
    if scored_record(metrics) is None:
        why = (f"--metrics {args.metrics} predates the provenance check: it does not record which "
               f"weights, classes and resolution it scored")
    else:
        why = (f"--metrics {args.metrics} do not match the model being published ({args.model}): "
               f"{'; '.join(problems)}")
    if not args.force:
        fail(f"{why}. Re-run the evaluate stage on this model (python stages/evaluate.py --recipe "
             f"{args.recipe} --model {args.model} --shards <its shards> --out <folder>), or pass "
             f"--force to publish these figures unchecked")
    own = list(config.pretrained_cfg.test_size)
    print(f"[publish] warning: --force: {why}. Publishing them unchecked: the card marks the "
          f"figures as not verified, and config.json keeps the model's own test settings "
          f"(test_input_size {own}), not the metrics'", file=sys.stderr)
    return problems


def _recipe_files(args: argparse.Namespace, config: ModelConfig) -> dict[str, Path]:
    """The runs' resolved recipes found from the model folder, or named by --pretrain-recipe."""
    recipe_files = lineage_recipes(args.model, config)
    if args.pretrain_recipe is not None:
        if not args.pretrain_recipe.is_file():
            fail(f"--pretrain-recipe {args.pretrain_recipe} not found")
        recipe_files["pretrain"] = args.pretrain_recipe
    return recipe_files


def _push(args: argparse.Namespace, section: PublishSection, folder: Path, repo: str) -> int:
    """Push the complete folder; a refusal or no Hub returns its exit code (2, 3 or 4)."""
    private = section.private if args.private is None else args.private
    revision = args.revision or section.revision
    try:
        url = push(folder, repo, private=private, revision=revision, force=args.force,
                   commit_message=args.commit_message or section.commit_message)
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"[publish] pushed {folder} to {repo}" + (f"@{revision}" if revision else "")
          + f": {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
