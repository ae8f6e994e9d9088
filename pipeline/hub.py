"""Publishing: a timm-compatible folder (safetensors + config.json + model card), and the Hub.

The folder loads with `timm.create_model("local-dir:<folder>", pretrained=True)`, and once pushed
with `timm.create_model("hf-hub:<org>/<name>", pretrained=True)`. Files:
    model.safetensors   the chosen weights (EMA by default); no pickle anywhere
    config.json         timm's hub format: architecture, model_args, num_classes, num_features,
                        global_pool, label_names, pretrained_cfg (input/test size, crop, mean/std)
    README.md           model card: YAML front matter (library_name, license, tags, datasets,
                        model-index from the evaluate stage's metrics) and how it was trained
    recipes/            the resolved recipes of the runs that made it
    SHA256SUMS          a sha256 of every other file
The token (HF_TOKEN or `huggingface-cli login`) is passed to huggingface_hub and nowhere else.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from safetensors.torch import load_file

from pipeline import checkpoint as ckpt
from pipeline.data.manifest import sha256_file
from pipeline.recipe import PublishSection

TIMM_CFG_KEYS = ("input_size", "test_input_size", "crop_pct", "test_crop_pct", "crop_mode",
                 "interpolation", "mean", "std", "classifier", "first_conv", "pool_size",
                 "num_classes", "license")


class PublishError(RuntimeError):
    pass


def hub_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for the Hub: timm's keys, our lineage kept under `nfnet_pipeline`."""
    pc = {k: v for k, v in config["pretrained_cfg"].items() if k in TIMM_CFG_KEYS}
    pc["num_classes"] = config["num_classes"]
    out = {k: config[k] for k in ("architecture", "num_classes", "num_features", "global_pool")}
    out["model_args"] = config.get("model_args", {})
    out["label_names"] = config.get("label_names", [])
    out["pretrained_cfg"] = pc
    if "nfnet_pipeline" in config:
        out["nfnet_pipeline"] = config["nfnet_pipeline"]
    return out


def check_weights(config: dict[str, Any], state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights that do not fit the architecture the config names."""
    with torch.device("meta"):
        model = timm.create_model(config["architecture"], pretrained=False,
                                  num_classes=config["num_classes"], **config.get("model_args", {}))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise PublishError(
            f"{source}: the tensors do not match {config['architecture']} "
            f"{config.get('model_args', {})}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, got[k], expected[k]) for k in wrong[:3]]}")


def eval_results(metrics: dict[str, Any], dataset_name: str, model_name: str) -> list:
    from huggingface_hub import EvalResult
    results = []
    for key, name in (("top1", "Top-1 accuracy"), ("top5", "Top-5 accuracy")):
        if key in metrics:
            results.append(EvalResult(task_type="image-classification", dataset_type=dataset_name,
                                      dataset_name=dataset_name, metric_type="accuracy",
                                      metric_name=name, metric_value=round(float(metrics[key]), 3)))
    return results


def model_card(config: dict[str, Any], section: PublishSection, metrics: Optional[dict],
               recipes: dict[str, str]) -> str:
    from huggingface_hub import ModelCard, ModelCardData
    lineage = config.get("nfnet_pipeline", {})
    data = ModelCardData(library_name="timm", license=section.license, tags=section.tags,
                         datasets=section.datasets, model_name=section.model_name,
                         pipeline_tag="image-classification",
                         eval_results=eval_results(metrics, section.datasets[0] if section.datasets
                                                   else "custom", section.model_name)
                         if metrics else None)
    pc = config["pretrained_cfg"]
    res_train, res_test = pc["input_size"][-1], pc.get("test_input_size", pc["input_size"])[-1]
    metric_lines = (f"| {metrics.get('split', 'val')} | {metrics.get('num_samples', '?')} | "
                    f"{metrics['top1']:.2f} | {metrics.get('top5', float('nan')):.2f} | "
                    f"{metrics.get('nll', float('nan')):.4f} | {metrics.get('ece', float('nan')):.4f} |"
                    if metrics else "| (not evaluated) | | | | | |")
    body = f"""
# {section.model_name}

An NFNet ({lineage.get('variant', config['architecture'])}, Brock et al. 2021, "High-Performance
Large-Scale Image Recognition Without Normalization") trained with the nfnet-pipeline:
pretraining, then fine-tuning with a new head at a higher resolution.

## How it was trained
- Architecture: timm `{config['architecture']}` with model_args `{json.dumps(config.get('model_args', {}))}`
- Pretraining: recipe `{recipes.get('pretrain', '?')}`; fine-tuning: recipe `{recipes.get('finetune', '?')}`
  (the resolved recipes are in `recipes/`)
- Initialised from: `{lineage.get('init', 'n/a')}` ({lineage.get('init_weights', 'n/a')} weights)
- Train resolution {res_train} px, test resolution {res_test} px, crop {pc.get('test_crop_pct', pc.get('crop_pct'))}
  ({pc.get('crop_mode', 'center')}), interpolation {pc.get('interpolation')}
- Weights in this repo: {section.weights} weights, {config['num_classes']} classes
- Datasets: {', '.join(section.datasets) or 'n/a'}

## Results (evaluate stage)
| split | samples | top-1 | top-5 | NLL | ECE |
|---|---|---|---|---|---|
{metric_lines}

## How to use
```python
import timm, torch
model = timm.create_model("hf-hub:<org>/{section.model_name}", pretrained=True).eval()
# or, from a local copy: timm.create_model("local-dir:/path/to/folder", pretrained=True)
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)
```

## Limits
- Accuracy holds for data like the evaluation split above; other domains need fine-tuning.
- Label names: {', '.join(map(str, config.get('label_names', [])[:20]))}{' ...' if len(config.get('label_names', [])) > 20 else ''}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return str(card)


def export_folder(model_dir: Path, out: Path, section: PublishSection,
                  metrics: Optional[dict[str, Any]], recipe_files: dict[str, Path],
                  force: bool = False, extra_texts: Optional[dict[str, str]] = None) -> Path:
    """Write the publishable folder `out` (atomically). Refuses a different model already there."""
    config = ckpt.read_model_config(model_dir)
    weights = ckpt.weights_file(model_dir, section.weights)
    state = load_file(str(weights))
    check_weights(config, state, weights)
    new_sha = sha256_file(weights)
    if out.exists() and any(out.iterdir()):
        old = out / "model.safetensors"
        if not old.is_file() or sha256_file(old) != new_sha:
            if not force:
                raise PublishError(f"{out} already holds a different model; pass --force to "
                                   f"replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shutil.copyfile(weights, tmp / "model.safetensors")   # same bytes: the sha stays the same
        cfg = hub_config(config)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "recipes").mkdir()
        names = {}
        for stage, path in recipe_files.items():
            if path.is_file():
                shutil.copyfile(path, tmp / "recipes" / f"{stage}.resolved.yaml")
                names[stage] = f"recipes/{stage}.resolved.yaml"
        for name, text in (extra_texts or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, section, metrics, names))
        sums = [f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}"
                for p in sorted(tmp.rglob("*")) if p.is_file()]
        (tmp / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push(folder: Path, section: PublishSection, repo: str, force: bool = False,
         token: Optional[str] = None) -> str:
    """Upload `folder` to the Hub repo (created if needed). Returns the commit URL.

    Raises PublishError with a plain message when the Hub cannot be reached; the local folder is
    complete either way.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)   # None: HF_TOKEN or the stored login, resolved by huggingface_hub
    try:
        api.create_repo(repo, private=section.private, exist_ok=True, repo_type="model")
        if section.revision:
            api.create_branch(repo, branch=section.revision, exist_ok=True)
        if not force:
            _refuse_different_model(api, repo, folder, section.revision)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 revision=section.revision,
                                 commit_message=section.commit_message or
                                 f"Upload {section.model_name} from nfnet-pipeline")
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        kind = type(e).__name__
        raise PublishError(f"the Hugging Face Hub cannot be reached ({kind}); nothing was "
                           f"uploaded. The local folder {folder} is complete: push it later with "
                           f"the same command when online.") from None
    return str(getattr(info, "commit_url", info))


def _refuse_different_model(api, repo: str, folder: Path, revision: Optional[str]) -> None:
    from huggingface_hub.errors import EntryNotFoundError
    try:
        remote = api.hf_hub_download(repo, "SHA256SUMS", revision=revision)
    except EntryNotFoundError:
        return
    local = (folder / "SHA256SUMS").read_text()
    weights_line = lambda text: [l for l in text.splitlines() if l.endswith("model.safetensors")]  # noqa: E731
    if weights_line(Path(remote).read_text()) != weights_line(local):
        raise PublishError(f"{repo} already holds a different model.safetensors; pass --force "
                           f"to replace it")
