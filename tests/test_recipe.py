"""The recipe schema: every shipped recipe validates; bad ones fail at once with a clear message."""
import pytest
import yaml

from conftest import ROOT, run_stage, run_stage_in_process, stage_main
from pipeline.plan import make_plan
from pipeline.recipe import RecipeError, load_recipe, resolved_text, to_dict
from pipeline.variants import get_variant

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path, mutate):
    data = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates_and_makes_a_plan(path):
    """Each shipped recipe loads, names a known variant whose resolutions it keeps (test >= train),
    plans both training stages on 8 processes, and survives the round trip through its resolved
    text (what every stage writes next to its outputs)."""
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.source == str(path)
    variant = get_variant(recipe.pretrain.model.variant)
    for stage in ("pretrain", "finetune"):
        section = getattr(recipe, stage)
        assert section.test_res >= section.train_res
        samples = section.expected_samples or 10_000          # the demos read it from the shards
        plan = make_plan(section, samples, 8)
        assert plan.total_steps > plan.warmup_steps >= 0 and plan.lr > 0
        doc = yaml.safe_load(resolved_text(recipe, stage))
        assert doc[stage] == to_dict(section)
    if path.stem in [f"f{i}" for i in range(8)]:
        assert recipe.pretrain.train_res == variant.train_res       # the paper's train px
        assert recipe.pretrain.test_res == variant.test_res


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


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "evaluate", "publish", "shard"])
def test_stage_scripts_fail_fast_on_a_bad_recipe(tmp_path, stage):
    path = _write(tmp_path, lambda d: d[stage].update(not_a_key=1))
    extra = {"pretrain": ["--shards", str(tmp_path)], "finetune": ["--init", "x", "--shards", str(tmp_path)],
             "evaluate": ["--model", "x", "--shards", "y"], "publish": ["--model", "x", "--out", "y"],
             "shard": ["--source", str(tmp_path), "--out", str(tmp_path / "o")]}[stage]
    p = run_stage_in_process(stage, "--recipe", str(path), *extra, check=False)
    assert p.returncode == 2, p.stderr
    assert f"{stage}.not_a_key" in p.stderr and "Allowed keys" in p.stderr


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["shard", "pretrain", "finetune", "evaluate", "publish"])
def test_stage_help(stage):
    p = run_stage_in_process(stage, "--help")
    assert p.returncode == 0 and "--recipe" in p.stdout and "python stages/" in p.stdout


BAD_VALUES = [  # (stage, override, the allowed range the message states)
    ("pretrain", "pretrain.micro_batch=0", ">= 1"),
    ("evaluate", "evaluate.batch=0", ">= 1"),
    ("pretrain", "pretrain.lr_base=-0.1", ">= 0"),
    ("pretrain", "pretrain.loader.num_workers=-1", ">= 0"),
    ("pretrain", "pretrain.train_res=0", ">= 16"),
    ("pretrain", "pretrain.augment.crop_scale=[1.5, 0.2]", "in (0, 1]"),
    ("pretrain", "pretrain.augment.crop_scale=[0.9, 0.2]", "[min, max] with 0 < min <= max <= 1"),
    ("pretrain", "pretrain.global_batch=-1", ">= 1"),
    ("finetune", "finetune.ema_decay=1.5", "in (0, 1)"),
    ("shard", "shard.jpeg_quality=101", "in [1, 100]"),
]


@pytest.mark.parametrize("stage,override,allowed", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_a_value_out_of_range_exits_2_before_any_file_is_written(tmp_path, demo_shards, capsys,
                                                                  stage, override, allowed):
    out = tmp_path / "out"
    recipe = str(ROOT / "recipes" / "demo.yaml")
    extra = {"pretrain": ["--shards", demo_shards["pretrain"], "--out", out],
             "finetune": ["--init", "none:tiny", "--shards", demo_shards["finetune"], "--out", out],
             "evaluate": ["--model", tmp_path / "m", "--shards", demo_shards["finetune"],
                          "--out", out],
             "shard": ["--source", tmp_path, "--out", out]}[stage]
    code = stage_main(stage, ["--recipe", recipe, *extra, override])
    key = override.split("=", 1)[0]
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"error: {recipe}") and f"'{key}" in err and allowed in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()                                  # nothing written
    if stage == "pretrain":                                  # --dry-run fails the same way
        assert stage_main(stage, ["--recipe", recipe, override, "--dry-run"]) == 2
        assert allowed in capsys.readouterr().err


@pytest.mark.integration
def test_the_real_script_exits_2_on_a_bad_value_without_a_traceback(tmp_path):
    p = run_stage("pretrain", "--recipe", str(ROOT / "recipes" / "demo.yaml"), "--dry-run",
                  "--processes", "1", "pretrain.micro_batch=0", timeout=120, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'pretrain.micro_batch' must be >= 1, got 0" in p.stderr
