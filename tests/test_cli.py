"""pipeline/cli.py (every stage) and pipeline/train_cli.py (the training stages): flags, errors,
the training data and the dry-run plan."""
import json

import pytest

from conftest import ROOT
from pipeline import cli, train_cli
from pipeline.lineage import data_lineage
from pipeline.model_config import ModelConfig
from pipeline.variants import build_model

RECIPE = str(ROOT / "recipes" / "f0.yaml")


def training_args(*argv):
    ap = cli.stage_parser("doc")
    train_cli.add_training_args(ap, "pretrain")
    return ap.parse_intermixed_args(list(argv))


def test_overrides_may_come_before_or_after_the_options():
    a = training_args("--recipe", RECIPE, "pretrain.epochs=2", "--out", "x", "pretrain.seed=3")
    assert a.overrides == ["pretrain.epochs=2", "pretrain.seed=3"] and str(a.out) == "x"
    assert a.resume == "auto" and a.processes is None and a.dry_run is None


def test_recipe_is_required_unless_the_stage_says_otherwise(capsys):
    with pytest.raises(SystemExit) as e:
        cli.stage_parser("doc").parse_args([])
    assert e.value.code == 2 and "--recipe" in capsys.readouterr().err
    assert cli.stage_parser("doc", recipe_required=False).parse_args([]).recipe is None


def test_fail_prints_one_error_line_and_exits_with_the_code(capsys):
    with pytest.raises(SystemExit) as e:
        cli.fail("shards missing", code=3)
    assert e.value.code == 3 and capsys.readouterr().err == "error: shards missing\n"


def test_a_bad_recipe_exits_2_with_the_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli.load_recipe_or_exit(RECIPE, ["pretrain.micro_batch=0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'pretrain.micro_batch' must be >= 1, got 0" in err


def test_dry_run_needs_expected_samples_or_shards(capsys):
    section = cli.load_recipe_or_exit(RECIPE, []).pretrain
    data = train_cli.training_data(training_args("--recipe", RECIPE, "--dry-run"), section, "pretrain")
    assert data.num_samples == section.expected_samples == 1281167 and len(data.class_names) == 1000
    assert data.split is None and data.val_split is None
    section.expected_samples = None
    with pytest.raises(SystemExit):
        train_cli.training_data(training_args("--recipe", RECIPE, "--dry-run"), section, "pretrain")
    assert "pretrain.expected_samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.training_data(training_args("--recipe", RECIPE), section, "pretrain")
    assert "--shards is required" in capsys.readouterr().err


def test_plan_or_exit_prints_the_plan_for_the_asked_process_count(capsys):
    section = cli.load_recipe_or_exit(RECIPE, []).pretrain
    model, arch, _ = build_model("f0", 1000, device="meta")
    config = ModelConfig(architecture=arch, num_classes=1000, lineage={"variant": "f0"})
    args = training_args("--recipe", RECIPE, "--dry-run", "json", "--processes", "8")
    with pytest.raises(SystemExit) as e:
        train_cli.plan_or_exit(args, section, "pretrain", 1281167, model, config)
    plan = json.loads(capsys.readouterr().out)
    assert e.value.code == 0 and plan["processes"] == 8 and plan["accum_steps"] == 2
    args = training_args("--recipe", RECIPE, "--dry-run", "--processes", "3")
    with pytest.raises(SystemExit) as e:
        train_cli.plan_or_exit(args, section, "pretrain", 1281167, model, config)
    assert e.value.code == 2 and "cannot be split evenly" in capsys.readouterr().err
    no_dry = training_args("--recipe", RECIPE)                  # not a dry run: this launch (1)
    assert train_cli.plan_or_exit(no_dry, section, "pretrain", 1281167, model, config).processes == 1


def test_data_lineage_hashes_the_manifest(demo_shards):
    args = training_args("--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]))
    lineage = data_lineage(args.shards, args.shard_url)
    assert lineage["shards"] == str(demo_shards["pretrain"]) and len(lineage["manifest_sha256"]) == 64
