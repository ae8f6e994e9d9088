"""The model card (README.md) of a published folder.

The text lives in `templates/model_card.md` (`string.Template`, `$name` placeholders); the
functions here build its parts: the front matter the Hub reads (huggingface_hub's ModelCardData,
with a model-index from the evaluate stage's metrics), the training lines from the resolved
recipes and the data they were sharded from (lineage.shard_data), the evaluation table and the
limits. The body names the data the runs recorded; the recipe's `publish.datasets` (Hub metadata)
stands in only where nothing is recorded, and the card says so.
"""
from __future__ import annotations

import json
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline.model_config import ModelConfig
from pipeline.recipe import PublishSection

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
# The training runs in the order they happened, whatever order they were found in.
RUNS = (("pretrain", "pre-trained", "Pre-training"), ("finetune", "fine-tuned", "Fine-tuning"))


def model_card(cfg: ModelConfig, section: PublishSection, metrics: dict[str, Any] | None,
               recipes: dict[str, dict[str, Any]], num_params: int, repo: str | None, *,
               data: dict[str, dict[str, Any]] | None = None,
               unchecked: list[str] | None = None) -> str:
    """README.md: front matter that the Hub reads (model-index from the evaluation) and a body
    that says how the model was trained and on what data, how to load it, and its limits.

    `cfg` is the published config.json, `recipes` the resolved recipes by stage (pretrain,
    finetune), `repo` the Hub repo it is pushed to (None: a placeholder in the usage example),
    `data` lineage.shard_data by stage (pretrain, finetune, evaluate), `unchecked` why the
    metrics could not be tied to these weights (publish was forced): the card says so."""
    arch = cfg.architecture
    data = data or {}
    test_res = cfg.pretrained_cfg.test_size[-1]
    about = ("An NFNet (Brock et al. 2021, \"High-Performance Large-Scale Image Recognition "
             "Without Normalization\")" if "nfnet" in arch else f"A timm `{arch}`")
    evaluated = _source(data.get("evaluate"))
    text = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        front_matter=_front_matter(section, metrics).to_yaml(),
        model_name=section.model_name, about=about, arch=arch,
        variant=cfg.variant,
        params=f"{num_params / 1e6:.3f}", num_classes=cfg.num_classes,
        runs=_runs(recipes, data), model_args=json.dumps(cfg.model_args),
        datasets=_data_line(section, recipes, data),
        training="\n".join(_training_lines(recipes, data)), weights=section.weights,
        evaluation=_evaluation(section, metrics, test_res, evaluated, unchecked or []),
        hub_id=repo or f"<org>/{section.model_name}", test_res=test_res,
        limits="\n".join(_limit_lines(cfg, metrics, evaluated or _dataset(section))))
    return str(ModelCard(text))             # no .validate(): it calls the Hub


def _source(facts: dict[str, Any] | None) -> str | None:
    """`/data/imagenet` (folder): where sharded data came from, or None when not recorded."""
    if not facts or not facts.get("source"):
        return None
    return f"`{facts['source']}` ({facts.get('source_kind') or 'source kind not recorded'})"


def _runs(recipes: dict[str, dict[str, Any]], data: dict[str, dict[str, Any]]) -> str:
    """The intro's "pre-trained on X, then fine-tuned on Y with nfnet-pipeline", in the order
    the runs happened."""
    done = [f"{verb} on {_source(data.get(stage))}" if _source(data.get(stage)) else verb
            for stage, verb, _ in RUNS if stage in recipes]
    if not done:
        return "trained with nfnet-pipeline (runs not recorded)"
    return ", then ".join(done) + " with nfnet-pipeline"


def _data_line(section: PublishSection, recipes: dict[str, dict[str, Any]],
               data: dict[str, dict[str, Any]]) -> str:
    """The data each run was trained on, from its shard manifest; the recipe's publish.datasets
    only when no run records data the card can read, and then it says so."""
    recorded = [(what.lower(), data[stage]) for stage, _, what in RUNS
                if stage in recipes and stage in data]
    parts = [f"{what}: not recorded ({facts['missing']})" if "missing" in facts else
             f"{what} on {_source(facts) or 'a source not recorded'}: "
             f"{facts['splits'].get('train', '?')} training images, {facts['num_classes']} classes"
             for what, facts in recorded]
    if any("missing" not in facts for _, facts in recorded):
        return "; then ".join(parts) + " (from the shard manifests the runs recorded)"
    named = ", ".join(section.datasets) or "none"
    return ("; ".join(parts) + ". " if parts else "") + \
        f"The runs record no data the card can read; the recipe names {named} (publish.datasets)"


def _dataset(section: PublishSection) -> str:
    return section.datasets[-1] if section.datasets else "custom"   # the evaluated one: last


def _front_matter(section: PublishSection, metrics: dict[str, Any] | None) -> ModelCardData:
    results = None
    if metrics:
        dataset = _dataset(section)
        results = [EvalResult(task_type="image-classification", task_name="Image Classification",
                              dataset_type=dataset, dataset_name=dataset,
                              dataset_split=metrics.get("split"), metric_type="accuracy",
                              metric_name=f"{name} accuracy (%)",
                              metric_value=round(float(metrics[key]), 3))
                   for key, name in (("top1", "Top-1"), ("top5", "Top-5")) if key in metrics]
    return ModelCardData(library_name="timm", license=section.license, tags=section.tags,
                         datasets=section.datasets, model_name=section.model_name,
                         pipeline_tag="image-classification", eval_results=results)


def _training_lines(recipes: dict[str, dict[str, Any]],
                    data: dict[str, dict[str, Any]]) -> list[str]:
    lines = [line for stage, _, what in RUNS if stage in recipes
             for line in _run_lines(stage, what, recipes[stage], data.get(stage))]
    return lines or ["- (no resolved recipes found)"]


def _shards_line(res: dict[str, Any], facts: dict[str, Any] | None) -> str:
    if not facts or "missing" in facts:
        why = facts["missing"] if facts else "not read"
        return (f"  - data: {res.get('num_samples', '?')} training images (shards "
                f"`{res.get('shards', '?')}`; their source is not stated: {why})")
    return (f"  - data: {facts['splits'].get('train', '?')} training images, "
            f"{facts['num_classes']} classes, from {_source(facts) or 'a source not recorded'}, "
            f"sharded to `{facts['shards']}` (manifest sha256 {facts['manifest_sha256'][:12]})")


def _run_lines(stage: str, what: str, doc: dict[str, Any],
               facts: dict[str, Any] | None) -> list[str]:
    """One run, from its resolved recipe and its shards: data, schedule, resolution, optimiser,
    augmentation, init."""
    sec, res = doc.get(stage, {}), doc.get("resolved", {})
    aug = sec.get("augment", {})
    overrides = f", overrides `{' '.join(doc['overrides'])}`" if doc.get("overrides") else ""
    lines = [f"- **{what}** (`recipes/{stage}.resolved.yaml`: recipe `{doc.get('name')}`"
             f"{overrides})"]
    if stage == "pretrain" and "model" in sec:
        lines.append(f"  - variant `{sec['model'].get('variant')}` "
                     f"(width {sec['model'].get('width', 1.0)})")
    lines += [
        _shards_line(res, facts),
        f"  - schedule: {sec.get('epochs', '?')} epochs = {res.get('total_steps', '?')} steps of "
        f"{res.get('global_batch', sec.get('global_batch'))} images on "
        f"{res.get('processes', '?')} process(es)",
        f"  - resolution: train {sec.get('train_res')} px, test {sec.get('test_res')} px, crop "
        f"{sec.get('crop_pct')}, {aug.get('interpolation', 'bicubic')}",
        f"  - SGD ({'Nesterov ' if sec.get('nesterov') else ''}momentum {sec.get('momentum')}), lr "
        f"{res.get('lr', '?')} with {res.get('warmup_steps', '?')} warm-up steps, weight decay "
        f"{sec.get('weight_decay')}, AGC clip {sec.get('clip_factor')}, label smoothing "
        f"{sec.get('label_smoothing')}, EMA decay {sec.get('ema_decay')}",
        f"  - augmentation: crop scale {aug.get('crop_scale')}, flip {aug.get('hflip')}, "
        f"RandAugment {aug.get('randaugment_layers')}x{aug.get('randaugment_magnitude')}, mixup "
        f"{aug.get('mixup_alpha')}, CutMix {aug.get('cutmix_alpha')}"]
    if stage == "finetune" and "init" in sec:
        init = sec["init"]
        lines.append(f"  - started from the pre-trained {init.get('weights')} weights with a new "
                     f"head ({init.get('head_init')} init), frozen: "
                     f"{init.get('freeze') or 'nothing'}")
    return lines


def _evaluation(section: PublishSection, metrics: dict[str, Any] | None, test_res: int,
                evaluated: str | None, unchecked: list[str]) -> str:
    if not metrics:
        return "Not evaluated: this card claims no accuracy."
    nan = float("nan")
    caveat = ""
    if unchecked:
        caveat = (f"**Not verified**: published with `--force`, these figures could not be checked "
                  f"against this model ({'; '.join(unchecked)}); they may have been measured on "
                  f"another model.\n\n")
    # the shards the evaluation records, else the recipe's name for the data (and it says so)
    of = evaluated or f"{_dataset(section)}, as the recipe's publish.datasets names it"
    return (
        f"{caveat}Measured by the evaluate stage on {metrics.get('num_samples')} held-out images "
        f"(split `{metrics.get('split')}` of {of}).\n\n"
        f"| weights | images | resolution | top-1 % | top-5 % | NLL | ECE |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {section.weights} | {metrics.get('num_samples')} | "
        f"{metrics.get('test_res', test_res)} px | {metrics['top1']:.2f} | "
        f"{metrics.get('top5', nan):.2f} | {metrics.get('nll', nan):.4f} | "
        f"{metrics.get('ece', nan):.4f} |")


def _limit_lines(cfg: ModelConfig, metrics: dict[str, Any] | None,
                 dataset: str) -> list[str]:
    pc = cfg.pretrained_cfg
    labels = list(cfg.label_names)
    named = ""
    if labels:
        named = f" ({', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''})"
    lines = [
        f"- It knows {len(labels) or cfg.num_classes} classes{named}; any other image is still "
        f"put into one of them.",
        f"- Use the test resolution ({pc.test_size[-1]} px, crop "
        f"{pc.test_crop}, {pc.crop_mode}), which "
        f"`resolve_data_config(..., use_test_size=True)` gives.",
        f"- The figures hold for data like the {dataset} evaluation split; other domains need "
        f"evaluating (and likely fine-tuning)." if metrics else "- Its accuracy is unknown."]
    if cfg.variant == "tiny":
        lines.append("- This is the CPU demo model (a tiny NFNet trained for minutes): it shows "
                     "the pipeline works and is not meant for real use.")
    return lines
