"""Lineage of a model folder: the resolved recipes of the runs that made it, and notes on what is
missing or differs (which the publish stage prints before writing the card).

Each training stage writes `<out>/model/` and `<out>/recipe.resolved.yaml` next to it; a fine-tuned
model's config.json links to the model it started from (`nfnet_pipeline.init`), so the recipes are
found by walking those links back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline import checkpoint as ckpt

# An init that is no model folder: from scratch (`none:<variant>`) or another timm model's weights.
_NOT_A_FOLDER = ("none:", "timm:")


def lineage_recipes(model_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
    """{stage: recipe.resolved.yaml} found by walking the model folders' `init` links back from
    `model_dir` (each stage writes `<out>/recipe.resolved.yaml` next to `<out>/model/`)."""
    found: dict[str, Path] = {}
    folder, cfg = Path(model_dir), config
    for _ in range(4):
        if (folder / "recipes").is_dir():                 # a published folder: its own recipes
            for f in sorted((folder / "recipes").glob("*.resolved.yaml")):
                found.setdefault(f.name.split(".")[0], f)
            break
        resolved = folder.parent / "recipe.resolved.yaml"
        if resolved.is_file():
            doc = yaml.safe_load(resolved.read_text()) or {}
            for stage in ("finetune", "pretrain"):
                if stage in doc:
                    found.setdefault(stage, resolved)
        init = _init(cfg)
        if not init or init.startswith(_NOT_A_FOLDER) or not Path(init).is_dir():
            break
        folder = Path(init)
        try:
            cfg = ckpt.read_model_config(folder)
        except ckpt.CheckpointError:
            break
    return found


def missing_recipe_notes(model_dir: Path, config: dict[str, Any],
                         recipe_files: dict[str, Path]) -> list[str]:
    """A note for each training run whose resolved recipe was not found (the card will not
    describe it). A model trained from scratch or from timm weights had no pre-training run."""
    notes = []
    for stage in ("pretrain", "finetune"):
        no_run = stage == "pretrain" and _init(config).startswith(_NOT_A_FOLDER)
        if stage in recipe_files or no_run:
            continue
        fix = " (pass --pretrain-recipe)" if stage == "pretrain" else ""
        notes.append(f"no {stage} recipe.resolved.yaml found from {model_dir}; the card will not "
                     f"describe that run{fix}")
    return notes


def evaluation_notes(config: dict[str, Any], metrics: dict[str, Any] | None) -> list[str]:
    """A note for each test setting (resolution, crop) the evaluation used that differs from the
    model folder's: config.json records the evaluated one, so the card's figures reproduce."""
    notes = []
    for key, flag in (("test_res", "test_input_size"), ("crop_pct", "test_crop_pct")):
        ours = config.get("pretrained_cfg", {}).get(flag)
        ours = ours[-1] if isinstance(ours, list) else ours
        if metrics and key in metrics and ours is not None and metrics[key] != ours:
            notes.append(f"evaluated with {key}={metrics[key]} (the model folder says {ours}); "
                         f"config.json records the evaluated setting")
    return notes


def _init(config: dict[str, Any]) -> str:
    return str(config.get("nfnet_pipeline", {}).get("init") or "")
