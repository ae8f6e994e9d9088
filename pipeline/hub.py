"""Publishing: a timm-compatible folder (safetensors + config.json + model card), and the Hub.

The folder loads with `timm.create_model("local-dir:<folder>", pretrained=True)`, and once pushed
with `timm.create_model("hf-hub:<org>/<name>", pretrained=True)`. Files:
    model.safetensors   the chosen weights (EMA by default), byte for byte; no pickle anywhere
    config.json         timm's hub format: architecture, model_args, num_classes, num_features,
                        global_pool, label_names, pretrained_cfg (input/test size, crop, mean/std,
                        classifier, first_conv); our lineage under `nfnet_pipeline`
    README.md           model card: YAML front matter (library_name, license, tags, datasets,
                        model-index from the evaluate stage's metrics) and how it was trained
    metrics.json        the evaluate stage's metrics (when there are some)
    recipes/            the resolved recipes of the runs that made it
    SHA256SUMS          a sha256 of every other file (`sha256sum -c SHA256SUMS` checks them)
Facts about the network (classifier, first conv, features, pooling) are read from the timm model
the config builds, never assumed, so a non-NFNet timm model publishes the same way.
The token (HF_TOKEN or `hf auth login`) is resolved by huggingface_hub and never seen here.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.io import sha256_file
from pipeline.recipe import PublishSection

WEIGHTS = "model.safetensors"
SUMS = "SHA256SUMS"


class PublishError(RuntimeError):
    """A refusal; the message names the problem and the fix. `exit_code` is the stage's."""
    exit_code = 2


class HubUnreachable(PublishError):
    exit_code = 3


class HubRejected(PublishError):
    exit_code = 4


# ------------------------------------------------------------------------------------------------
# The model: its own facts, and weights that fit it
# ------------------------------------------------------------------------------------------------

def meta_model(config: dict[str, Any]) -> nn.Module:
    """The timm network config.json describes, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return ckpt.build_from_config(config)


def _global_pool(model: nn.Module, default: str) -> str:
    for owner in (getattr(model, "head", None), model):      # NFNet: head.global_pool; ResNet: model
        pool = getattr(owner, "global_pool", None)
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str) and pool:
            return pool
    return default


def check_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path,
                  arch: str) -> None:
    """Refuse weights that do not fit the network (names and shapes), or that are not finite."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (the architecture has {expected[k]})"
             for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    if missing or unexpected or wrong:
        raise PublishError(
            f"{source}: the tensors do not match the architecture {arch} in config.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}. "
            f"Publish the model folder the training stage wrote, unmodified")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PublishError(f"{source}: non-finite values in {bad[:3]}: the run diverged; "
                           f"publish an earlier checkpoint")


def hub_config(config: dict[str, Any], model: nn.Module, license: Optional[str] = None,
               metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json for timm. Preprocessing comes from the run (test size, crop and interpolation
    from the evaluation when there is one, so the card's figures are what timm reproduces);
    classifier, first conv, features and pooling from the built model."""
    own = dict(getattr(model, "pretrained_cfg", None) or {})     # the architecture's timm defaults
    run = config.get("pretrained_cfg") or {}
    pc: dict[str, Any] = {"input_size": list(run.get("input_size") or own["input_size"])}
    pc["test_input_size"] = list(run.get("test_input_size") or pc["input_size"])
    pc["crop_pct"] = run.get("crop_pct", own.get("crop_pct"))
    pc["test_crop_pct"] = run.get("test_crop_pct", pc["crop_pct"])
    for key in ("crop_mode", "interpolation", "mean", "std"):
        pc[key] = run.get(key, own.get(key))
    if metrics:
        if metrics.get("test_res"):
            pc["test_input_size"] = [pc["input_size"][0], metrics["test_res"], metrics["test_res"]]
        pc["test_crop_pct"] = metrics.get("crop_pct", pc["test_crop_pct"])
        for key in ("crop_mode", "interpolation"):         # timm has one of each, used at test time
            pc[key] = metrics.get(key, pc[key])
    pc["classifier"] = own.get("classifier")
    pc["first_conv"] = own.get("first_conv")
    pc["num_classes"] = model.num_classes
    if license:
        pc["license"] = license
    labels = list(config.get("label_names") or [])
    if labels and len(labels) != model.num_classes:
        raise PublishError(f"config.json names {len(labels)} labels for {model.num_classes} "
                           f"classes: the model folder is inconsistent; re-run its stage")
    out = {"architecture": config["architecture"], "model_args": config.get("model_args", {}),
           "num_classes": model.num_classes, "num_features": int(model.num_features),
           "global_pool": _global_pool(model, config.get("global_pool", "avg")),
           "label_names": labels, "pretrained_cfg": pc}
    if "nfnet_pipeline" in config:
        out["nfnet_pipeline"] = config["nfnet_pipeline"]
    return out


def _check_named_layers(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    # timm uses these names to swap the head (num_classes=...) and adapt the stem (in_chans=...)
    for key in ("classifier", "first_conv"):
        names = cfg["pretrained_cfg"][key]
        for name in [names] if isinstance(names, str) else list(names or []):
            if key == "classifier" and cfg["num_classes"] == 0:
                continue
            if f"{name}.weight" not in state:
                raise PublishError(f"timm's {key} for {cfg['architecture']} is '{name}', but the "
                                   f"weights have no '{name}.weight'")


def metrics_for(metrics: dict[str, Any], weights: str, source: Path) -> dict[str, Any]:
    """The evaluate stage's figures for the published weights (its primary weights are at the top
    of metrics.json, the others under their name)."""
    if metrics.get("weights", weights) == weights:
        return metrics
    if isinstance(metrics.get(weights), dict):
        return {**metrics, **metrics[weights], "weights": weights}
    raise PublishError(f"{source} has no figures for the {weights} weights being published: "
                       f"evaluate them (evaluate.weights) or publish the {metrics.get('weights')} ones")


# ------------------------------------------------------------------------------------------------
# Lineage: the resolved recipes of the runs that made the model
# ------------------------------------------------------------------------------------------------

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
        init = str(cfg.get("nfnet_pipeline", {}).get("init") or "")
        if not init or init.startswith(("none:", "timm:")) or not Path(init).is_dir():
            break
        folder = Path(init)
        try:
            cfg = ckpt.read_model_config(folder)
        except ckpt.CheckpointError:
            break
    return found


def _run_lines(stage: str, doc: dict[str, Any]) -> list[str]:
    sec, res = doc.get(stage, {}), doc.get("resolved", {})
    aug = sec.get("augment", {})
    what = "Pre-training" if stage == "pretrain" else "Fine-tuning"
    lines = [f"- **{what}** (`recipes/{stage}.resolved.yaml`: recipe `{doc.get('name')}`"
             + (f", overrides `{' '.join(doc['overrides'])}`" if doc.get("overrides") else "") + ")"]
    if stage == "pretrain" and "model" in sec:
        lines.append(f"  - variant `{sec['model'].get('variant')}` (width {sec['model'].get('width', 1.0)})")
    lines += [
        f"  - data: {res.get('num_samples', '?')} training images; {sec.get('epochs', '?')} epochs "
        f"= {res.get('total_steps', '?')} steps of {res.get('global_batch', sec.get('global_batch'))} "
        f"images on {res.get('processes', '?')} process(es)",
        f"  - resolution: train {sec.get('train_res')} px, test {sec.get('test_res')} px, crop "
        f"{sec.get('crop_pct')}, {aug.get('interpolation', 'bicubic')}",
        f"  - SGD ({'Nesterov ' if sec.get('nesterov') else ''}momentum {sec.get('momentum')}), lr "
        f"{res.get('lr', '?')} with {res.get('warmup_steps', '?')} warm-up steps, weight decay "
        f"{sec.get('weight_decay')}, AGC clip {sec.get('clip_factor')}, label smoothing "
        f"{sec.get('label_smoothing')}, EMA decay {sec.get('ema_decay')}",
        f"  - augmentation: crop scale {aug.get('crop_scale')}, flip {aug.get('hflip')}, RandAugment "
        f"{aug.get('randaugment_layers')}x{aug.get('randaugment_magnitude')}, mixup "
        f"{aug.get('mixup_alpha')}, CutMix {aug.get('cutmix_alpha')}"]
    if stage == "finetune" and "init" in sec:
        lines.append(f"  - started from the pre-trained {sec['init'].get('weights')} weights with a "
                     f"new head ({sec['init'].get('head_init')} init), frozen: "
                     f"{sec['init'].get('freeze') or 'nothing'}")
    return lines


# ------------------------------------------------------------------------------------------------
# The model card
# ------------------------------------------------------------------------------------------------

def model_card(cfg: dict[str, Any], section: PublishSection, metrics: Optional[dict[str, Any]],
               recipes: dict[str, dict[str, Any]], num_params: int, repo: Optional[str]) -> str:
    """README.md: front matter that the Hub reads (model-index from the evaluation) and a body
    that says how the model was trained, how to load it, and its limits."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    lineage = cfg.get("nfnet_pipeline", {})
    arch, pc = cfg["architecture"], cfg["pretrained_cfg"]
    dataset = section.datasets[-1] if section.datasets else "custom"   # the evaluated one: last
    results = None
    if metrics:
        results = [EvalResult(task_type="image-classification", task_name="Image Classification",
                              dataset_type=dataset, dataset_name=dataset,
                              dataset_split=metrics.get("split"), metric_type="accuracy",
                              metric_name=f"{name} accuracy (%)", metric_value=round(float(metrics[key]), 3))
                   for key, name in (("top1", "Top-1"), ("top5", "Top-5")) if key in metrics]
    data = ModelCardData(library_name="timm", license=section.license, tags=section.tags,
                         datasets=section.datasets, model_name=section.model_name,
                         pipeline_tag="image-classification", eval_results=results)
    variant = lineage.get("variant", arch)
    test_res = pc["test_input_size"][-1]
    labels = [str(x) for x in cfg.get("label_names") or []]
    trained = [line for stage in ("pretrain", "finetune") if stage in recipes
               for line in _run_lines(stage, recipes[stage])] or ["- (no resolved recipes found)"]
    evaluated = "Not evaluated: this card claims no accuracy."
    if metrics:
        evaluated = (
            f"Measured by the evaluate stage on {metrics.get('num_samples')} held-out images (split "
            f"`{metrics.get('split')}` of {dataset}).\n\n| weights | images | resolution | top-1 % | "
            f"top-5 % | NLL | ECE |\n|---|---|---|---|---|---|---|\n| {section.weights} | "
            f"{metrics.get('num_samples')} | {metrics.get('test_res', test_res)} px | "
            f"{metrics['top1']:.2f} | {metrics.get('top5', float('nan')):.2f} | "
            f"{metrics.get('nll', float('nan')):.4f} | {metrics.get('ece', float('nan')):.4f} |")
    limits = [
        f"- It knows {len(labels) or cfg['num_classes']} classes"
        + (f" ({', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''})" if labels else "")
        + "; any other image is still put into one of them.",
        f"- Use the test resolution ({test_res} px, crop {pc.get('test_crop_pct')}, "
        f"{pc.get('crop_mode')}), which `resolve_data_config(..., use_test_size=True)` gives.",
        f"- The figures hold for data like the {dataset} evaluation split; other domains need "
        f"evaluating (and likely fine-tuning)." if metrics else "- Its accuracy is unknown."]
    if variant == "tiny":
        limits.append("- This is the CPU demo model (a tiny NFNet trained for minutes): it shows the "
                      "pipeline works and is not meant for real use.")
    about = ("An NFNet (Brock et al. 2021, \"High-Performance Large-Scale Image Recognition Without "
             "Normalization\")" if "nfnet" in arch else f"A timm `{arch}`")
    hub_id = repo or f"<org>/{section.model_name}"
    body = f"""
# {section.model_name}

{about} image classifier: timm `{arch}`, variant `{variant}`, {num_params / 1e6:.3f} M parameters,
{cfg['num_classes']} classes, trained with nfnet-pipeline ({' then '.join(recipes) or 'runs not recorded'}).

## How it was trained
- Architecture: timm `{arch}` with `model_args` `{json.dumps(cfg.get('model_args', {}))}`
- Datasets: {', '.join(section.datasets) or 'n/a'}
{chr(10).join(trained)}
- Published weights: {section.weights} (`model.safetensors`, the same bytes as the training run's)

## Evaluation
{evaluated}

## How to use
```python
import timm, torch
model = timm.create_model("hf-hub:{hub_id}", pretrained=True).eval()
# from a local copy of this folder: timm.create_model("local-dir:/path/to/folder", pretrained=True)
cfg = timm.data.resolve_data_config({{}}, model=model, use_test_size=True)   # {test_res} px
transform = timm.data.create_transform(**cfg)
```
`model_args` in config.json rebuild the exact network; `num_classes=N` swaps the head for transfer.

## Limits
{chr(10).join(limits)}

## Files
`SHA256SUMS` holds a sha256 of every file; `recipes/` the resolved recipes; `metrics.json` the
evaluation.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))   # no .validate(): it calls the Hub


# ------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------

def _check_destination(out: Path, new_sha: str, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PublishError(f"--out {out} is a file: give a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SUMS).is_file():      # not ours (a training run's model folder, a checkout...)
        raise PublishError(f"{out} exists and is not a folder this stage wrote (no {SUMS}): "
                           f"choose another --out (it is replaced as a whole; --force does not "
                           f"apply here)")
    old = out / WEIGHTS
    if (not old.is_file() or sha256_file(old) != new_sha) and not force:
        raise PublishError(f"{out} already holds a different model; pass --force to replace it, "
                           f"or choose another --out")


def export_folder(model_dir: Path, out: Path, section: PublishSection,
                  metrics: Optional[dict[str, Any]], recipe_files: dict[str, Path],
                  force: bool = False, extra_texts: Optional[dict[str, str]] = None,
                  repo: Optional[str] = None) -> Path:
    """Write the publishable folder `out` atomically (nothing half-written is ever visible).
    Refuses weights that do not fit the architecture, and a different model already at `out`."""
    config = ckpt.read_model_config(model_dir)
    weights = ckpt.weights_file(model_dir, section.weights)
    model = meta_model(config)
    state = load_file(str(weights))
    check_weights(model, state, weights, config["architecture"])
    cfg = hub_config(config, model, section.license, metrics)
    _check_named_layers(cfg, state)
    num_params = sum(t.numel() for t in state.values())
    _check_destination(out, sha256_file(weights), force)
    recipes = {stage: yaml.safe_load(p.read_text()) for stage, p in recipe_files.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = tmp.with_suffix(".old")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                  # mkdtemp makes 0700: a normal folder's mode
        shutil.copyfile(weights, tmp / WEIGHTS)         # same bytes: the sha stays the same
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "recipes").mkdir()
        for stage, path in recipe_files.items():
            shutil.copyfile(path, tmp / "recipes" / f"{stage}.resolved.yaml")
        for name, text in (extra_texts or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, section, metrics, recipes, num_params, repo))
        sums = [f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}"
                for p in sorted(tmp.rglob("*")) if p.is_file()]
        (tmp / SUMS).write_text("\n".join(sums) + "\n")
        if out.exists():
            os.replace(out, old)                        # swap, then delete: `out` is never partial
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# The Hub
# ------------------------------------------------------------------------------------------------

def _transport_errors() -> tuple[type, ...]:
    """Exceptions that mean "no answer from the Hub", for whichever HTTP client huggingface_hub
    uses (httpx2 in 2.x, httpx in 1.x, requests before)."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    found: list[type] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _refuse_different_model(api, repo: str, folder: Path, revision: Optional[str]) -> None:
    """Refuse when `repo` (at `revision`) holds a model.safetensors with other bytes than ours.
    The Hub reports an LFS file's sha256, so nothing is downloaded (*.safetensors are LFS files on
    the Hub; one that is not counts as different)."""
    from huggingface_hub.errors import RevisionNotFoundError
    try:
        remote = [f for f in api.get_paths_info(repo, [WEIGHTS], revision=revision,
                                                 repo_type="model") if f.path == WEIGHTS]
    except RevisionNotFoundError:
        return                                        # a new branch: nothing there to overwrite
    if not remote:
        return
    lfs = getattr(remote[0], "lfs", None)
    if lfs is None or lfs.sha256 != sha256_file(folder / WEIGHTS):
        at = f"{repo}@{revision}" if revision else repo
        raise PublishError(f"{at} already holds a different model.safetensors; nothing was "
                           f"uploaded. Pass --force to replace it, or choose another --repo / "
                           f"--revision (the local folder {folder} is complete)")


def push(folder: Path, repo: str, *, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, force: bool = False) -> str:
    """Upload `folder` as one commit to the Hub model repo `repo` (created if needed); the
    revision ends up holding exactly the folder's files. Returns the commit URL.

    Raises HubUnreachable when there is no answer (offline, no network), HubRejected when the Hub
    answers with an error (no or bad token, no write access), PublishError when the repo holds a
    different model and `force` is off. In every case the local folder is complete.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()         # the token: HF_TOKEN or the stored login, resolved inside huggingface_hub
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if not force:
            _refuse_different_model(api, repo, folder, revision)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 revision=revision, delete_patterns="*",
                                 commit_message=commit_message or f"Publish {folder.name} "
                                 f"({sha256_file(folder / WEIGHTS)[:12]}) from nfnet-pipeline")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "no valid token: set HF_TOKEN or run `hf auth login`",
                403: f"the token may not write to {repo.split('/')[0]}: use a write token"}.get(
                    status, _first_line(e))
        raise HubRejected(f"the Hugging Face Hub refused ({status}): {hint}. Nothing was uploaded; "
                          f"the local folder {folder} is complete") from None
    except _transport_errors() as e:
        raise HubUnreachable(f"the Hugging Face Hub cannot be reached ({type(e).__name__}: "
                             f"{_first_line(e)}); nothing was uploaded. The local folder {folder} "
                             f"is complete: run the same command again when online") from None
    return str(getattr(info, "commit_url", info))


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text
