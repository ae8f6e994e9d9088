"""pipeline/lineage.py: the resolved recipes found from a model folder (its `init` links), the
notes on what is missing or differs, whether an evaluation's record matches the model, and the
data a run was sharded from (real manifests written by the manifest module)."""
import dataclasses

import yaml

from pipeline.data.manifest import manifest_path, write_manifest
from pipeline.files import sha256_file
from pipeline.lineage import (
    evaluation_notes,
    lineage_recipes,
    missing_recipe_notes,
    provenance_problems,
    run_data,
    scored_record,
    shard_data,
)
from pipeline.model_config import ModelConfig, Preprocessing


def model_folder(run, init=None, stage=None, test_res=40, crop_pct=1.0):
    """`<run>/model/config.json` (its required keys and what the lineage reads), and with `stage`
    the run's `<run>/recipe.resolved.yaml`."""
    (run / "model").mkdir(parents=True)
    config = ModelConfig(architecture="dm_nfnet_f0", num_classes=3,
                         pretrained_cfg=Preprocessing(test_input_size=(3, test_res, test_res),
                                                      test_crop_pct=crop_pct),
                         lineage={"init": str(init)} if init else {})
    config.save(run / "model")
    if stage:
        (run / "recipe.resolved.yaml").write_text(yaml.safe_dump({"name": "demo", stage: {}}))
    return run / "model", ModelConfig.load(run / "model")


def test_lineage_notes_name_a_missing_recipe_and_a_different_test_setting(tmp_path):
    moved, _ = model_folder(tmp_path / "moved-pretrain")                    # no recipe next to it
    model, config = model_folder(tmp_path / "finetune", init=moved, stage="finetune")
    found = lineage_recipes(model, config)
    assert found == {"finetune": tmp_path / "finetune" / "recipe.resolved.yaml"}
    assert missing_recipe_notes(model, config, found) == [
        f"no pretrain recipe.resolved.yaml found from {model}; the card will not describe that "
        f"run (pass --pretrain-recipe)"]
    pre, _ = model_folder(tmp_path / "pretrain", stage="pretrain")
    model, config = model_folder(tmp_path / "finetune2", init=pre, stage="finetune")
    found = lineage_recipes(model, config)
    assert set(found) == {"pretrain", "finetune"} and not missing_recipe_notes(model, config, found)
    scratch, config = model_folder(tmp_path / "scratch", init="none:tiny")     # no pre-training run
    assert missing_recipe_notes(scratch, config, {}) == [
        f"no finetune recipe.resolved.yaml found from {scratch}; the card will not describe "
        f"that run"]

    # a different test resolution is no note but a refusal (provenance_problems)
    assert evaluation_notes(config, {"test_res": 48, "crop_pct": 1.0}) == []
    assert evaluation_notes(config, {"test_res": 40, "crop_pct": 0.875}) == [
        "evaluated with crop_pct=0.875 (the model folder says 1.0); config.json records the "
        "evaluated setting"]
    config = dataclasses.replace(config, pretrained_cfg=dataclasses.replace(
        config.pretrained_cfg, interpolation="bicubic"))
    assert evaluation_notes(config, {"crop_pct": 1.0, "interpolation": "bilinear"}) == [
        "evaluated with interpolation=bilinear (the model folder says bicubic); config.json "
        "records the evaluated setting"]
    assert evaluation_notes(config, {"test_res": 40, "crop_pct": 1.0}) == []
    assert evaluation_notes(config, None) == []


def test_provenance_problems_name_what_differs_expected_and_got(tmp_path):
    weights = tmp_path / "ema.safetensors"
    weights.write_bytes(b"the published bytes")
    sha = sha256_file(weights)
    config = ModelConfig.from_dict(
        {"architecture": "dm_nfnet_f0", "num_classes": 3, "label_names": ["cat", "dog", "fox"],
         "pretrained_cfg": {"input_size": [3, 32, 32], "test_input_size": [3, 40, 40]}})
    record = {"weights": {"ema": {"file": str(weights), "sha256": sha}},
              "class_names": ["cat", "dog", "fox"], "test_res": 40}
    metrics = {"top1": 90.0, "scored": [record]}
    assert scored_record(metrics) == record
    assert provenance_problems(config, metrics, weights, "ema") == []

    other = {"file": "/runs/other/model/ema.safetensors", "sha256": "9f" * 32}
    foreign = {"scored": [{**record, "weights": {"ema": other}, "class_names": ["a", "b", "c"],
                           "test_res": [48, 48]}]}
    assert provenance_problems(config, foreign, weights, "ema") == [
        f"ema weights: expected the sha256 of {weights} ({sha[:12]}), got 9f9f9f9f9f9f (it scored "
        f"/runs/other/model/ema.safetensors)",
        "classes: expected config.json label_names [cat, dog, fox] (3), got [a, b, c] (3)",
        "test resolution: expected config.json pretrained_cfg.test_input_size 40 px, got 48 px"]
    raw_only = {"scored": [{**record, "weights": {"raw": other}}]}
    assert provenance_problems(config, raw_only, weights, "ema") == [
        f"ema weights: expected the sha256 of {weights} ({sha[:12]}), got none (it scored raw "
        f"weights)"]
    # no label names in config.json: the class indices, as the evaluate stage names them
    unnamed = dataclasses.replace(config, label_names=())
    assert provenance_problems(unnamed, {"scored": [{**record, "class_names": ["0", "1", "2"]}]},
                               weights, "ema") == []
    old = {"top1": 90.0, "test_res": 40}
    assert scored_record(old) is None
    assert provenance_problems(config, old, weights, "ema") == [
        "it predates the provenance check (no `scored` record of the weights, classes and "
        "resolution it measured)"]


def shards_with_manifest(root, source=True, num_train=30):
    """A shard folder as far as the lineage reads it: `_info.json` (with the source, or as older
    manifests without) and the shard stage's `recipe.resolved.yaml` next to it."""
    root.mkdir(parents=True)
    info = {"num_classes": 3, "class_names": ["cat", "dog", "fox"],
            "splits": {"train": {"name": "train", "num_samples": num_train},
                       "val": {"name": "val", "num_samples": 9}}}
    if source:
        info["source"] = {"kind": "folder", "location": "/data/pets"}
    write_manifest(root, info)
    (root / "recipe.resolved.yaml").write_text(yaml.safe_dump(
        {"name": "demo", "shard": {}, "resolved": {"source": "/data/pets-old", "source_kind": "hf"}}))
    return root


def test_run_data_reads_the_manifest_the_run_recorded_and_nothing_else(tmp_path):
    shards = shards_with_manifest(tmp_path / "shards")
    sha = sha256_file(manifest_path(shards))
    doc = {"name": "demo", "pretrain": {}, "resolved": {"shards": str(shards),
                                                       "manifest_sha256": sha}}
    assert run_data(doc) == {"shards": str(shards), "source": "/data/pets", "source_kind": "folder",
                             "num_classes": 3, "splits": {"train": 30, "val": 9},
                             "manifest_sha256": sha}
    # an older manifest without its source: the shard stage's resolved recipe names it
    older = shards_with_manifest(tmp_path / "older", source=False)
    facts = shard_data(older)
    assert (facts["source"], facts["source_kind"], facts["splits"]["train"]) == \
        ("/data/pets-old", "hf", 30)
    # re-sharded since the run: the folder now holds other data, which is not the run's
    write_manifest(shards, {"num_classes": 3, "splits": {"train": {"num_samples": 31}}})
    assert "has changed since" in run_data(doc)["missing"]
    assert run_data({"resolved": {"shards": str(tmp_path / "gone")}}) == {
        "missing": f"its shard manifest {tmp_path / 'gone' / '_info.json'} is no longer there"}
    assert run_data({"name": "demo", "pretrain": {}}) == {
        "missing": "its resolved recipe records no shards"}
