"""The publishable folder: timm-compatible weights, config.json and model card, written atomically.

The folder loads with `timm.create_model("local-dir:<folder>", pretrained=True)`. Files:
    model.safetensors   the chosen weights (EMA by default), byte for byte; no pickle anywhere
    config.json         timm's hub format: architecture, model_args, num_classes, num_features,
                        global_pool, label_names, pretrained_cfg (input/test size, crop, mean/std,
                        classifier, first_conv); our lineage under `nfnet_pipeline`
    README.md           the model card (pipeline.model_card)
    metrics.json        the evaluate stage's metrics (when there are some; the publish stage
                        checks first that they were measured on these weights: lineage.py)
    recipes/            the resolved recipes of the runs that made it (pipeline.lineage finds them)
    SHA256SUMS          a sha256 of every other file (`sha256sum -c SHA256SUMS` checks them)
Facts about the network (classifier, first conv, features, pooling) are read from the timm model
the config builds, never assumed, so a non-NFNet timm model publishes the same way.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from pipeline.files import atomic_dir, sha256_file
from pipeline.lineage import run_data, scored_record, shard_data
from pipeline.model_card import model_card
from pipeline.model_config import ModelConfig, Preprocessing
from pipeline.model_dir import build_from_config, weights_file, weights_mismatch
from pipeline.recipe import PublishSection

WEIGHTS = "model.safetensors"
SUMS = "SHA256SUMS"


class PublishError(RuntimeError):
    """A refusal; the message names the problem and the fix. `exit_code` is the publish stage's:
    2 for a refusal (here), 3 when the Hub cannot be reached and 4 when it answers with an error
    (the subclasses in pipeline.hub)."""
    exit_code = 2


# ------------------------------------------------------------------------------------------------
# The model: its own facts, and weights that fit it
# ------------------------------------------------------------------------------------------------

def meta_model(config: ModelConfig) -> nn.Module:
    """The timm network config.json describes, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return build_from_config(config)


def _global_pool(model: nn.Module, default: str) -> str:
    for owner in (getattr(model, "head", None), model):   # NFNet: head.global_pool; ResNet: model
        pool = getattr(owner, "global_pool", None)
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str) and pool:
            return pool
    return default


def check_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path,
                  arch: str) -> None:
    """Refuse weights that do not fit the network (names and shapes), or that are not finite."""
    problem = weights_mismatch(model, state)
    if problem is not None:
        raise PublishError(f"{source}: the tensors do not match the architecture {arch} in "
                           f"config.json: {problem}. Publish the model folder the training stage "
                           f"wrote, unmodified")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PublishError(f"{source}: non-finite values in {bad[:3]}: the run diverged; "
                           f"publish an earlier checkpoint")


def _preprocessing(config: ModelConfig, model: nn.Module, license: str | None,
                   metrics: dict[str, Any] | None) -> Preprocessing:
    """The published `pretrained_cfg`: the run's settings, every size and crop stated (as
    model_config.py resolves them); an evaluation's crop and interpolation over them, so that
    what timm reproduces at test time is what the card's figures were measured with (the test
    size is always the model's own: metrics at another resolution are refused, or, forced, not
    passed here); classifier and first conv from the built model; the class count and license."""
    own = getattr(model, "pretrained_cfg", None) or {}        # the architecture's timm defaults
    pc = dataclasses.replace(config.pretrained_cfg.resolved(), classifier=own.get("classifier"),
                             first_conv=own.get("first_conv"), extra={})
    if metrics:
        pc = dataclasses.replace(pc, test_crop_pct=metrics.get("crop_pct", pc.test_crop_pct),
                                 crop_mode=metrics.get("crop_mode", pc.crop_mode),
                                 interpolation=metrics.get("interpolation", pc.interpolation))
    extra = {"num_classes": model.num_classes, **({"license": license} if license else {})}
    return dataclasses.replace(pc, extra=extra)


def hub_config(config: ModelConfig, model: nn.Module, license: str | None = None,
               metrics: dict[str, Any] | None = None) -> ModelConfig:
    """config.json for timm. Preprocessing comes from the run (crop and interpolation from the
    evaluation when there is one, so the card's figures are what timm reproduces; `metrics` must
    be this model's, see lineage.provenance_problems); classifier, first conv, features and
    pooling from the built model. Keys of the model folder's config.json that timm and this
    project do not read (ModelConfig.extra) are not published."""
    if config.label_names and len(config.label_names) != model.num_classes:
        raise PublishError(f"config.json names {len(config.label_names)} labels for "
                           f"{model.num_classes} classes: the model folder is inconsistent; "
                           f"re-run its stage")
    return ModelConfig(architecture=config.architecture, model_args=config.model_args,
                       num_classes=model.num_classes, num_features=int(model.num_features),
                       global_pool=_global_pool(model, config.global_pool),
                       label_names=config.label_names,
                       pretrained_cfg=_preprocessing(config, model, license, metrics),
                       lineage=config.lineage)


def _check_named_layers(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    # timm uses these names to swap the head (num_classes=...) and adapt the stem (in_chans=...)
    for key in ("classifier", "first_conv"):
        names = getattr(cfg.pretrained_cfg, key)
        for name in [names] if isinstance(names, str) else list(names or []):
            if key == "classifier" and cfg.num_classes == 0:
                continue
            if f"{name}.weight" not in state:
                raise PublishError(f"timm's {key} for {cfg.architecture} is '{name}', but the "
                                   f"weights have no '{name}.weight'")


def weights_to_publish(model_dir: Path, weights: str) -> Path:
    """The file `export_folder` publishes for publish.weights (ema / raw)."""
    return weights_file(model_dir, weights)


def metrics_for(metrics: dict[str, Any], weights: str, source: Path) -> dict[str, Any]:
    """The evaluate stage's figures for the published weights (its primary weights are at the top
    of metrics.json, the others under their name)."""
    if metrics.get("weights", weights) == weights:
        return metrics
    if isinstance(metrics.get(weights), dict):
        return {**metrics, **metrics[weights], "weights": weights}
    raise PublishError(f"{source} has no figures for the {weights} weights being published: "
                       f"evaluate them (evaluate.weights) or publish the {metrics.get('weights')} "
                       f"ones")


# ------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------

def _check_destination(out: Path, weights: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PublishError(f"--out {out} is a file: give a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SUMS).is_file():      # not ours (a training run's model folder, a checkout...)
        raise PublishError(f"{out} exists and is not a folder this stage wrote (no {SUMS}): "
                           f"choose another --out (it is replaced as a whole; --force does not "
                           f"apply here)")
    old = out / WEIGHTS
    if not force and (not old.is_file() or sha256_file(old) != sha256_file(weights)):
        raise PublishError(f"{out} already holds a different model; pass --force to replace it, "
                           f"or choose another --out")


def _write_sums(folder: Path) -> None:
    sums = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}"
            for p in sorted(folder.rglob("*")) if p.is_file()]
    (folder / SUMS).write_text("\n".join(sums) + "\n")


def _data(recipes: dict[str, dict[str, Any]], metrics: dict[str, Any] | None) -> dict[str, Any]:
    """{stage: lineage.shard_data} of the training runs' shards and the evaluated ones."""
    data = {stage: run_data(doc) for stage, doc in recipes.items()
            if stage in ("pretrain", "finetune")}
    scored = scored_record(metrics)
    if scored and scored.get("shards"):
        data["evaluate"] = shard_data(scored["shards"], scored.get("manifest_sha256"))
    return data


def export_folder(model_dir: Path, out: Path, section: PublishSection,
                  metrics: dict[str, Any] | None, recipe_files: dict[str, Path],
                  force: bool = False, extra_texts: dict[str, str] | None = None,
                  repo: str | None = None, unchecked: list[str] | None = None) -> Path:
    """Write the publishable folder `out` as a whole or not at all (io.atomic_dir). Refuses
    weights that do not fit the architecture, and a different model already at `out`.
    `extra_texts`: {relative path: text} written as well (the publish stage's own recipe).
    `unchecked`: why `metrics` could not be tied to these weights (publish was forced past
    lineage.provenance_problems): config.json then takes nothing from them and the card says so."""
    config = ModelConfig.load(model_dir)
    weights = weights_to_publish(model_dir, section.weights)
    model = meta_model(config)
    state = load_file(str(weights))
    check_weights(model, state, weights, config.architecture)
    cfg = hub_config(config, model, section.license, None if unchecked else metrics)
    _check_named_layers(cfg, state)
    _check_destination(out, weights, force)
    recipes = {stage: yaml.safe_load(p.read_text()) for stage, p in recipe_files.items()}
    num_params = sum(t.numel() for t in state.values())
    texts = {"config.json": cfg.to_json(), **(extra_texts or {})}
    if metrics is not None:
        texts["metrics.json"] = json.dumps(metrics, indent=2) + "\n"
    texts["README.md"] = model_card(cfg, section, metrics, recipes, num_params, repo,
                                    data=_data(recipes, metrics), unchecked=unchecked or [])

    needs = weights.stat().st_size + sum(len(t.encode()) for t in texts.values())
    with atomic_dir(out, what="the published folder", needs=needs) as tmp:
        shutil.copyfile(weights, tmp / WEIGHTS)         # same bytes: the sha stays the same
        (tmp / "recipes").mkdir()
        for stage, path in recipe_files.items():
            shutil.copyfile(path, tmp / "recipes" / f"{stage}.resolved.yaml")
        for name, text in texts.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        _write_sums(tmp)
    return out
