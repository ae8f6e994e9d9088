"""pipeline/lineage.py: the resolved recipes found from a model folder (its `init` links), and the
notes on what is missing or differs."""
import json

import yaml

from pipeline.lineage import evaluation_notes, lineage_recipes, missing_recipe_notes


def model_folder(run, init=None, stage=None, test_res=40, crop_pct=1.0):
    """`<run>/model/config.json` as far as the lineage reads it, and with `stage` the run's
    `<run>/recipe.resolved.yaml`."""
    (run / "model").mkdir(parents=True)
    config = {"pretrained_cfg": {"test_input_size": [3, test_res, test_res],
                                 "test_crop_pct": crop_pct},
              "nfnet_pipeline": {"init": str(init)} if init else {}}
    (run / "model" / "config.json").write_text(json.dumps(config))
    if stage:
        (run / "recipe.resolved.yaml").write_text(yaml.safe_dump({"name": "demo", stage: {}}))
    return run / "model", config


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

    assert evaluation_notes(config, {"test_res": 48, "crop_pct": 1.0}) == [
        "evaluated with test_res=48 (the model folder says 40); config.json records the "
        "evaluated setting"]
    assert evaluation_notes(config, {"test_res": 40, "crop_pct": 0.875}) == [
        "evaluated with crop_pct=0.875 (the model folder says 1.0); config.json records the "
        "evaluated setting"]
    assert evaluation_notes(config, {"test_res": 40, "crop_pct": 1.0}) == []
    assert evaluation_notes(config, None) == []
