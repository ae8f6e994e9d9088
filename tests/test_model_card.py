"""pipeline.model_card: the card built from real resolved recipes (made by the same recipe and plan
code the training stages use, so no training is needed), read back with huggingface_hub's own
parser. The card of a trained model, through the stage: tests/test_publish.py."""
import re

import yaml
from huggingface_hub import ModelCard

from conftest import ROOT
from pipeline.model_card import TEMPLATE, model_card
from pipeline.model_config import ModelConfig
from pipeline.plan import make_plan
from pipeline.recipe import load_recipe, resolved_text

RECIPE = ROOT / "recipes" / "demo.yaml"
OVERRIDES = ["finetune.train_res=32", "finetune.test_res=40"]
SAMPLES = {"pretrain": 355, "finetune": 360}        # as the demo's shards of digits 0-4 and 5-9
METRICS = {"weights": "ema", "split": "val", "num_samples": 180, "top1": 91.23456, "top5": 99.5,
           "nll": 0.31, "ece": 0.021, "test_res": 40, "crop_pct": 1.0}
SECTIONS = ["How it was trained", "Evaluation", "How to use", "Limits", "Files"]
# lineage.shard_data of each run's shards and the evaluated ones
DATA = {"pretrain": {"shards": "/shards/digits-0-4", "source": "/raw/digits-0-4",
                     "source_kind": "folder", "num_classes": 5,
                     "splits": {"train": 355, "val": 90}, "manifest_sha256": "ab" * 32},
        "finetune": {"shards": "/shards/digits-5-9", "source": "/raw/digits-5-9",
                     "source_kind": "folder", "num_classes": 5,
                     "splits": {"train": 360, "val": 179}, "manifest_sha256": "cd" * 32}}
DATA["evaluate"] = DATA["finetune"]


def resolved_recipes(overrides=OVERRIDES) -> dict[str, dict]:
    """{stage: the recipe.resolved.yaml document} as pretrain and finetune write them."""
    recipe = load_recipe(RECIPE, list(overrides))
    return {stage: yaml.safe_load(resolved_text(
                recipe, stage, make_plan(getattr(recipe, stage), SAMPLES[stage], 1).as_dict(),
                list(overrides)))
            for stage in ("pretrain", "finetune")}


def hub_cfg(arch="dm_nfnet_f0", variant="tiny", labels=("5", "6", "7", "8", "9")) -> ModelConfig:
    """The published config.json, as far as the card reads it."""
    return ModelConfig.from_dict(
        {"architecture": arch, "model_args": {"channels": [32, 64, 96, 128]},
         "num_classes": len(labels), "label_names": list(labels),
         "pretrained_cfg": {"input_size": [3, 32, 32], "test_input_size": [3, 40, 40],
                            "test_crop_pct": 1.0, "crop_mode": "squash"},
         "nfnet_pipeline": {"variant": variant}})


def card(cfg=None, metrics=METRICS, recipes=None, repo=None, overrides=(), data=None,
         unchecked=None) -> ModelCard:
    section = load_recipe(RECIPE, list(overrides)).publish
    text = model_card(cfg or hub_cfg(), section, metrics,
                      resolved_recipes() if recipes is None else recipes, 26_000, repo,
                      data=DATA if data is None else data, unchecked=unchecked)
    return ModelCard(text)


def test_model_card_front_matter_and_body():
    recipes = resolved_recipes()
    found = card(recipes=recipes, repo="my-org/nfnet-tiny")
    assert found.data.library_name == "timm" and found.data.license == "apache-2.0"
    assert found.data.datasets == ["sklearn-digits"] and "nfnet" in found.data.tags
    assert found.data.pipeline_tag == "image-classification"
    results = {r.metric_name: r for r in found.data.eval_results}
    top1 = results["Top-1 accuracy (%)"]
    assert top1.metric_value == round(METRICS["top1"], 3) and top1.dataset_split == "val"
    assert results["Top-5 accuracy (%)"].metric_value == round(METRICS["top5"], 3)
    pre, fin = recipes["pretrain"], recipes["finetune"]
    body = found.text
    for fact in ("variant `tiny`", f"{pre['resolved']['num_samples']} training images",
                 f"{fin['resolved']['num_samples']} training images",
                 f"= {fin['resolved']['total_steps']} steps", "train 32 px, test 40 px",
                 "finetune.test_res=40", "local-dir:", "use_test_size=True", "## Limits",
                 f"{METRICS['num_samples']} held-out images", 'hf-hub:my-org/nfnet-tiny"',
                 "| ema | 180 | 40 px | 91.23 | 99.50 | 0.3100 | 0.0210 |",
                 "0.026 M parameters", "It knows 5 classes (5, 6, 7, 8, 9)",
                 "This is the CPU demo model"):
        assert fact in body, fact
    assert "Not verified" not in body


def test_the_body_names_the_sharded_data_and_the_runs_in_the_order_they_happened():
    """Found fine-tuning first (as lineage walks back from the model), told pre-training first;
    the data is what the shard manifests record, not the recipe's publish.datasets."""
    recipes = resolved_recipes()
    body = card(recipes={"finetune": recipes["finetune"], "pretrain": recipes["pretrain"]}).text
    assert "5 classes, pre-trained on `/raw/digits-0-4` (folder), then fine-tuned on " \
           "`/raw/digits-5-9` (folder) with nfnet-pipeline." in body
    assert "- Data: pre-training on `/raw/digits-0-4` (folder): 355 training images, 5 classes; " \
           "then fine-tuning on `/raw/digits-5-9` (folder): 360 training images, 5 classes " \
           "(from the shard manifests the runs recorded)" in body
    assert body.index("**Pre-training**") < body.index("**Fine-tuning**")
    assert "  - data: 360 training images, 5 classes, from `/raw/digits-5-9` (folder), sharded " \
           "to `/shards/digits-5-9` (manifest sha256 cdcdcdcdcdcd)" in body
    assert "held-out images (split `val` of `/raw/digits-5-9` (folder))" in body
    assert "sklearn-digits" not in body                 # the Hub metadata only
    assert card().data.datasets == ["sklearn-digits"]


def test_without_recorded_data_the_card_says_the_recipe_names_it():
    recipes = resolved_recipes()
    gone = {"missing": "its shard manifest /shards/x/_info.json is no longer there"}
    body = card(data={"pretrain": gone, "finetune": gone}).text
    assert "- Data: pre-training: not recorded (its shard manifest /shards/x/_info.json is no " \
           "longer there); fine-tuning: not recorded (its shard manifest /shards/x/_info.json " \
           "is no longer there). The runs record no data the card can read; the recipe names " \
           "sklearn-digits (publish.datasets)" in body
    assert f"  - data: {recipes['pretrain']['resolved']['num_samples']} training images (shards " \
           "`?`; their source is not stated: its shard manifest" in body
    assert "pre-trained, then fine-tuned with nfnet-pipeline" in body
    assert "(split `val` of sklearn-digits, as the recipe's publish.datasets names it)" in body
    # one run recorded, the other not: the recorded one is stated, the other said to be missing
    body = card(data={"pretrain": gone, "finetune": DATA["finetune"]}).text
    assert "- Data: pre-training: not recorded (its shard manifest" in body
    assert "then fine-tuning on `/raw/digits-5-9` (folder): 360 training images" in body
    assert "the recipe names" not in body


def test_forced_metrics_are_marked_not_verified():
    why = ["ema weights: expected the sha256 of model/ema.safetensors (b564910e2058), got 9f9f"]
    body = card(unchecked=why).text
    assert "**Not verified**: published with `--force`, these figures could not be checked " \
           f"against this model ({why[0]}); they may have been measured on another model." in body


def test_every_section_in_order_and_every_placeholder_filled():
    text = str(card())
    assert [m.group(1) for m in re.finditer(r"^## (.+)$", text, re.M)] == SECTIONS
    assert "$" not in text and "$" in TEMPLATE.read_text()
    assert text.startswith("---\n") and "\n---\n\n# nfnet-tiny-digits\n" in text
    assert 'hf-hub:<org>/nfnet-tiny-digits"' in text           # no repo: a placeholder to fill in


def test_an_unevaluated_card_claims_no_accuracy_and_says_what_it_is():
    resnet = hub_cfg(arch="resnet18", variant="tiny_bn", labels=[str(i) for i in range(25)])
    found = card(resnet, metrics=None, recipes={}, data={})
    assert not found.data.eval_results
    for fact in ("Not evaluated: this card claims no accuracy", "Its accuracy is unknown",
                 "A timm `resnet18` image classifier", "(no resolved recipes found)",
                 "trained with nfnet-pipeline (runs not recorded)",
                 "the recipe names sklearn-digits (publish.datasets)",
                 "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, "
                 "16, 17, 18, 19 ...)"):
        assert fact in found.text, fact
    assert "NFNet" not in found.text and "CPU demo model" not in found.text


def test_raw_weights_and_a_fine_tune_from_scratch_are_described():
    recipes = {"finetune": resolved_recipes()["finetune"]}
    text = card(recipes=recipes, overrides=["publish.weights=raw"]).text
    assert "- Published weights: raw" in text and "| raw |" in text
    assert "Pre-training" not in text and "pre-trained on" not in text
    assert "5 classes, fine-tuned on `/raw/digits-5-9` (folder) with nfnet-pipeline." in text
    assert "- Data: fine-tuning on `/raw/digits-5-9` (folder)" in text
    assert "started from the pre-trained ema weights with a new head (zeros init)" in text
