"""The recipe schema: every shipped recipe validates; bad ones fail at once with a clear message."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import RecipeError, load_recipe, resolved_text

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path, mutate):
    data = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name
    for section in ("shard", "pretrain", "finetune", "evaluate", "publish"):
        assert getattr(recipe, section) is not None


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = _write(tmp_path, lambda d: d["pretrain"].update(lr_bsae=0.1))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "pretrain.lr_bsae" in msg
    assert "Allowed keys in 'pretrain'" in msg and "lr_base" in msg


def test_wrong_type_names_key_expected_and_got(tmp_path):
    path = _write(tmp_path, lambda d: d["pretrain"].update(global_batch="big"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "pretrain.global_batch" in msg and "must be int" in msg and "'big'" in msg


def test_nested_wrong_type_and_literal(tmp_path):
    path = _write(tmp_path, lambda d: d["finetune"]["init"].update(weights="best"))
    with pytest.raises(RecipeError, match=r"finetune\.init\.weights.*'ema' \| 'raw'.*'best'"):
        load_recipe(path)


def test_bool_is_not_an_int(tmp_path):
    path = _write(tmp_path, lambda d: d["pretrain"].update(micro_batch=True))
    with pytest.raises(RecipeError, match="pretrain.micro_batch"):
        load_recipe(path)


def test_missing_key(tmp_path):
    path = _write(tmp_path, lambda d: d["pretrain"].pop("lr_base"))
    with pytest.raises(RecipeError, match="missing key 'pretrain.lr_base'"):
        load_recipe(path)


def test_missing_file_lists_recipes(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes" / "f99.yaml")
    assert "recipe file not found" in str(e.value) and "demo.yaml" in str(e.value)


def test_epochs_and_steps_are_exclusive(tmp_path):
    path = _write(tmp_path, lambda d: d["pretrain"].update(steps=100))
    with pytest.raises(RecipeError, match="exactly one of 'epochs' and 'steps'"):
        load_recipe(path)


def test_yaml11_exponent_floats_are_accepted(tmp_path):
    path = _write(tmp_path, lambda d: d["pretrain"].update(weight_decay="2e-5"))
    assert load_recipe(path).pretrain.weight_decay == pytest.approx(2e-5)


def test_dotted_overrides():
    r = load_recipe(ROOT / "recipes" / "demo.yaml",
                    ["pretrain.epochs=3", "pretrain.augment.hflip=true", "evaluate.weights=[raw]"])
    assert r.pretrain.epochs == 3.0 and r.pretrain.augment.hflip is True
    assert r.evaluate.weights == ["raw"]


def test_bad_override_key_and_type():
    with pytest.raises(RecipeError, match="pretrain.epohcs"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["pretrain.epohcs=3"])
    with pytest.raises(RecipeError, match="with overrides.*pretrain.epochs.*got str"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["pretrain.epochs=three"])
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(ROOT / "recipes" / "demo.yaml", ["pretrain.epochs"])


def test_resolved_text_has_section_and_derived_values():
    r = load_recipe(ROOT / "recipes" / "demo.yaml", ["pretrain.epochs=2"])
    doc = yaml.safe_load(resolved_text(r, "pretrain", {"lr": 0.1}, ["pretrain.epochs=2"]))
    assert doc["pretrain"]["epochs"] == 2.0 and doc["resolved"] == {"lr": 0.1}
    assert doc["overrides"] == ["pretrain.epochs=2"] and "finetune" not in doc


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "evaluate", "publish", "shard"])
def test_stage_scripts_fail_fast_on_a_bad_recipe(tmp_path, stage):
    path = _write(tmp_path, lambda d: d[stage].update(not_a_key=1))
    extra = {"pretrain": ["--shards", str(tmp_path)], "finetune": ["--init", "x", "--shards", str(tmp_path)],
             "evaluate": ["--model", "x", "--shards", "y"], "publish": ["--model", "x", "--out", "y"],
             "shard": ["--source", str(tmp_path), "--out", str(tmp_path / "o")]}[stage]
    p = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--recipe", str(path),
                        *extra], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert f"{stage}.not_a_key" in p.stderr and "Allowed keys" in p.stderr


@pytest.mark.parametrize("stage", ["shard", "pretrain", "finetune", "evaluate", "publish"])
def test_stage_help(stage):
    p = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--recipe" in p.stdout and "python stages/" in p.stdout
