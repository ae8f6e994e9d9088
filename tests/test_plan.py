"""The run plan: values derived from a recipe section, the data and the launch."""
import pytest

from conftest import ROOT
from pipeline.model_config import ModelConfig
from pipeline.plan import describe, make_plan
from pipeline.recipe import load_recipe
from pipeline.variants import build_model


def test_plan_derives_lr_steps_warmup_and_accumulation():
    f0 = load_recipe(ROOT / "recipes" / "f0.yaml").pretrain
    plan = make_plan(f0, 1281167, processes=8)
    assert plan.lr == pytest.approx(1.6) and plan.total_steps == 112602
    assert plan.warmup_steps == pytest.approx(5 * 1281167 / 4096)          # 1563.92, not rounded
    assert plan.images_per_example == 2 and plan.images_per_step == 8192   # DeepMind's pairs
    assert (plan.micro_batch, plan.accum_steps) == (256, 2)            # 8 x 256 x 2 = 4096
    plan64 = make_plan(f0, 1281167, processes=64)
    assert (plan64.micro_batch, plan64.accum_steps) == (64, 1)         # capped by the share
    ft = load_recipe(ROOT / "recipes" / "f0.yaml").finetune
    assert make_plan(ft, 1281167, 8).lr == 0.1                         # not scaled by the batch
    with pytest.raises(ValueError, match="cannot be split evenly"):
        make_plan(f0, 1281167, processes=3)


def test_plan_refuses_runs_without_steps_or_with_a_warmup_as_long_as_the_run():
    demo = load_recipe(ROOT / "recipes" / "demo.yaml",
                       ["pretrain.epochs=2", "pretrain.warmup_epochs=2"]).pretrain
    with pytest.raises(ValueError, match="no optimizer steps"):
        make_plan(demo, 10, processes=1)                               # 2 x 10 samples < 1 batch
    with pytest.raises(ValueError, match="must be shorter than the run"):
        make_plan(demo, 64 * 4, processes=1)                           # warm-up == run


def test_describe_reads_the_typed_model_section():
    section = load_recipe(ROOT / "recipes" / "f1.yaml").pretrain
    model, arch, _ = build_model("f1", 1000, device="meta")
    plan = make_plan(section, 1281167, 8)
    config = ModelConfig(architecture=arch, num_classes=1000, lineage={"variant": "f1"})
    d = describe(plan, section, model, config)
    assert (d["variant"], d["architecture"], d["num_classes"]) == ("f1", arch, 1000)
    assert (d["drop_rate"], d["drop_path_rate"]) == (section.model.drop_rate,
                                                     section.model.drop_path_rate) == (0.3, 0.25)
    assert d["parameters"] == 132_634_256 and d["total_steps"] == 112602
