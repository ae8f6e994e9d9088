"""Lineage of a model folder: the resolved recipes of the runs that made it, the data they were
sharded from, whether an evaluation belongs to it, and notes on what is missing or differs (which
the publish stage prints before writing the card).

Each training stage writes `<out>/model/` and `<out>/recipe.resolved.yaml` next to it; a fine-tuned
model's config.json links to the model it started from (`nfnet_pipeline.init`), so the recipes are
found by walking those links back. A run's resolved recipe records its shard folder and the sha256
of the shard manifest (`_info.json`: classes, samples per split, the source); the evaluate stage's
metrics.json records what it scored (`scored`: weights sha256, classes, test settings, data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.data.manifest import ManifestError, manifest_path, read_manifest
from pipeline.files import sha256_file
from pipeline.model_config import ModelConfig, ModelError

# An init that is no model folder: from scratch (`none:<variant>`) or another timm model's weights.
_NOT_A_FOLDER = ("none:", "timm:")



def data_lineage(shards: str | Path, shard_url: str | None) -> dict[str, Any]:
    """Where a stage's data came from (its shard folder, URL template and the manifest's sha256),
    for the training stages' resolved recipes and the evaluate stage's record."""
    return {"shards": str(shards), "shard_url": shard_url,
            "manifest_sha256": sha256_file(manifest_path(shards))}

def lineage_recipes(model_dir: Path, config: ModelConfig) -> dict[str, Path]:
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
        init = cfg.init
        if not init or init.startswith(_NOT_A_FOLDER) or not Path(init).is_dir():
            break
        folder = Path(init)
        try:
            cfg = ModelConfig.load(folder)
        except ModelError:
            break
    return found


def missing_recipe_notes(model_dir: Path, config: ModelConfig,
                         recipe_files: dict[str, Path]) -> list[str]:
    """A note for each training run whose resolved recipe was not found (the card will not
    describe it). A model trained from scratch or from timm weights had no pre-training run."""
    notes = []
    for stage in ("pretrain", "finetune"):
        no_run = stage == "pretrain" and config.init.startswith(_NOT_A_FOLDER)
        if stage in recipe_files or no_run:
            continue
        fix = " (pass --pretrain-recipe)" if stage == "pretrain" else ""
        notes.append(f"no {stage} recipe.resolved.yaml found from {model_dir}; the card will not "
                     f"describe that run{fix}")
    return notes


def evaluation_notes(config: ModelConfig, metrics: dict[str, Any] | None) -> list[str]:
    """A note for each test setting (crop, interpolation) that an evaluation of this very model
    used and its folder does not: config.json records the evaluated one, so the card's figures
    reproduce. (A different test resolution is refused: `provenance_problems`.)"""
    pc = config.pretrained_cfg
    notes = []
    for key, ours in (("crop_pct", pc.test_crop), ("interpolation", pc.interpolation)):
        if metrics and key in metrics and metrics[key] != ours:
            notes.append(f"evaluated with {key}={metrics[key]} (the model folder says {ours}); "
                         f"config.json records the evaluated setting")
    return notes


# ------------------------------------------------------------------------------------------------
# Does an evaluation belong to this model?
# ------------------------------------------------------------------------------------------------

def scored_record(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluate stage's record of what it scored (metrics.json `scored`: a one-item list, so
    that `dvc metrics show` leaves it out of its table), or None in older files."""
    scored = (metrics or {}).get("scored")
    return scored[0] if isinstance(scored, list) and scored and isinstance(scored[0], dict) else None


def _resolution(size: Any) -> tuple[int, int] | None:
    """(height, width) from 40, [40, 48] or config.json's [3, 40, 48]."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) >= 2:
        return int(size[-2]), int(size[-1])
    return None


def _px(res: tuple[int, int] | None) -> str:
    if res is None:
        return "not recorded"
    return f"{res[0]} px" if res[0] == res[1] else f"{res[0]}x{res[1]} px"


def model_test_res(config: ModelConfig) -> tuple[int, int]:
    """The model's test resolution as timm and the evaluate stage read it (model_config.py)."""
    h, w = config.pretrained_cfg.test_size[-2:]
    return h, w


def provenance_problems(config: ModelConfig, metrics: dict[str, Any], weights_file: Path,
                        weights: str) -> list[str]:
    """What shows that `metrics` were not measured on this model: the sha256 of `weights_file`
    (the file being published, labelled `weights`), config.json's label names and its test
    resolution against the evaluation's record. [] when they belong together."""
    scored = scored_record(metrics)
    if scored is None:
        return ["it predates the provenance check (no `scored` record of the weights, classes "
                "and resolution it measured)"]
    problems = []
    recorded = (scored.get("weights") or {}).get(weights) or {}
    sha = sha256_file(weights_file)
    if recorded.get("sha256") != sha:
        got = (f"{recorded['sha256'][:12]} (it scored {recorded.get('file')})"
               if recorded.get("sha256") else
               f"none (it scored {', '.join(scored.get('weights') or {}) or 'no'} weights)")
        problems.append(f"{weights} weights: expected the sha256 of {weights_file} "
                        f"({sha[:12]}), got {got}")
    ours = config.class_names                  # as the evaluate stage reads them
    theirs_names = [str(n) for n in scored.get("class_names") or []]
    if theirs_names != ours:
        problems.append(f"classes: expected config.json label_names {_few(ours)}, got "
                        f"{_few(theirs_names)}")
    res, evaluated = model_test_res(config), _resolution(scored.get("test_res"))
    if res != evaluated:
        problems.append(f"test resolution: expected config.json pretrained_cfg.test_input_size "
                        f"{_px(res)}, got {_px(evaluated)}")
    return problems


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"[{shown}] ({len(names)})"


# ------------------------------------------------------------------------------------------------
# The data a run was trained on, as sharded
# ------------------------------------------------------------------------------------------------

def shard_data(shards: str | Path, manifest_sha256: str | None = None) -> dict[str, Any]:
    """What the shard folder holds, from its manifest (and the shard stage's resolved recipe next
    to it): {"shards", "source", "source_kind", "num_classes", "splits": {split: samples},
    "manifest_sha256"}; {"missing": why} when the manifest is gone, or has changed since
    `manifest_sha256` was recorded (the shards then hold other data than the run saw)."""
    path = manifest_path(shards)
    try:
        info = read_manifest(shards)
    except ManifestError:
        return {"missing": f"its shard manifest {path} is no longer there"}
    sha = sha256_file(path)
    if manifest_sha256 and sha != manifest_sha256:
        return {"missing": f"its shard manifest {path} has changed since (sha256 {sha[:12]}, the "
                           f"run recorded {manifest_sha256[:12]})"}
    source = info.get("source") or {}
    if not source.get("location"):           # older manifests: the shard stage's resolved recipe
        resolved = Path(shards) / "recipe.resolved.yaml"
        res = (yaml.safe_load(resolved.read_text()) or {}).get("resolved", {}) \
            if resolved.is_file() else {}
        source = {"location": res.get("source"), "kind": res.get("source_kind")}
    return {"shards": str(shards), "source": source.get("location"),
            "source_kind": source.get("kind"),
            "num_classes": int(info.get("num_classes") or len(info.get("class_names") or [])),
            "splits": {k: int(v["num_samples"]) for k, v in info["splits"].items()},
            "manifest_sha256": sha}


def run_data(doc: dict[str, Any]) -> dict[str, Any]:
    """`shard_data` of the shards a training run's resolved recipe records."""
    res = doc.get("resolved") or {}
    if not res.get("shards"):
        return {"missing": "its resolved recipe records no shards"}
    return shard_data(res["shards"], res.get("manifest_sha256"))

