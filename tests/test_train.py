"""The training run (pipeline/train.py): its phases, its typed result, the first losses of a seeded
run pinned (a change to the training step shows up here as a diff), object-storage URLs."""
import csv
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD, ROOT, run_stage, run_stage_in_process, tiny_pretrain_job
from pipeline import train
from pipeline.batchnorm import train_mode
from pipeline.checkpoint import CheckpointError
from pipeline.plan import make_plan
from pipeline.preemption import RunControl
from pipeline.recipe import load_recipe
from pipeline.variants import build_model

RECIPE = str(ROOT / "recipes" / "demo.yaml")
TINY = ["pretrain.train_res=32", "pretrain.test_res=32", "pretrain.epochs=2", "pretrain.eval_every=0",
        "pretrain.loader.num_workers=0"]

# A seeded tiny run with every part of the step switched on (MixUp + CutMix, dropout, stochastic
# depth, AGC, EMA, label smoothing, 2 micro-batches a step) and a high lr, so that the body learns
# within 16 steps (the head starts at zero: the first steps move little). In-batch pairs: with
# DeepMind's disjoint pairs and RandAugment after mixing the tiny net learns too little in 16 steps
# for the pin to see a changed clip factor (measured 5e-5); tests/test_mixing.py and the kill -9
# resume test pin that path exactly instead. No RandAugment here either: DeepMind's magnitudes are
# absolute (at 9: 90 px translations, a 72 px Cutout), so at 32 px most examples turn grey and a
# changed clip factor moved the losses by 6e-5 only; tests/test_randaugment.py pins every
# operation bit for bit against DeepMind's code.
PINNED_RUN = ["pretrain.steps=16", "pretrain.epochs=null", "pretrain.warmup_steps=2",
              "pretrain.warmup_epochs=null", "pretrain.global_batch=32", "pretrain.micro_batch=16",
              "pretrain.train_res=32", "pretrain.test_res=32", "pretrain.log_every=1",
              "pretrain.loader.num_workers=0", "pretrain.eval_every=0", "pretrain.lr_base=4.0",
              "pretrain.augment.mixup_alpha=0.2", "pretrain.augment.cutmix_alpha=1.0",
              "pretrain.model.drop_rate=0.1", "pretrain.model.drop_path_rate=0.1"]
# Measured 2026-12-03 (torch 2.14.1, timm 1.0.31, 1 thread). Changing the clip factor from 0.04 to
# 0.03 moves step 16 by 2.1e-3, weight decay 2e-5 -> 1e-3 step 16 by 1.0e-3: well outside the
# tolerance. Re-pin only for an intended change, and say why in the commit. History: pinned
# 2026-12-01; re-pinned the same day (mixing plans per fetch, DeepMind's weight standardisation,
# issue 13); re-pinned 2026-12-03 (issue 19, pixels meant to change: images paired 2j with 2j + 1
# within a stream, MixUp or CutMix by the example's place in its stream, SplitMix64 sample seeds
# and so other crops; RandAugment dropped from the run, see above).
PINNED_LOSSES = [1.609025478363037, 1.6086056232452393, 1.6099660396575928, 1.6100995540618896,
                 1.6087455749511719, 1.606804370880127, 1.6048686504364014, 1.6069867610931396,
                 1.5971665382385254, 1.6030035018920898, 1.5853545665740967, 1.6047728061676025,
                 1.572825312614441, 1.6105366945266724, 1.5925242900848389, 1.5772032737731934]


def _weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.integration
def test_first_losses_of_a_seeded_run_are_pinned(demo_shards, tmp_path):
    run_stage("pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]),
              "--out", str(tmp_path), *PINNED_RUN, env=ONE_THREAD)
    with open(tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    losses = [float(r["loss"]) for r in rows]
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-4), losses


@pytest.mark.integration
def test_shards_read_through_pipe_urls_train_identically(demo_shards, tmp_path):
    shards = demo_shards["pretrain"]
    common = ["--recipe", RECIPE, "--shards", str(shards), *TINY]
    run_stage_in_process("pretrain", *common, "--out", str(tmp_path / "local"))
    run_stage_in_process("pretrain", *common, "--out", str(tmp_path / "pipe"),
                         "--shard-url", f"pipe:cat {shards}/{{name}}")
    assert _max_diff(_weights(tmp_path / "local"), _weights(tmp_path / "pipe")) == 0.0


def _job(shards, out, overrides=(), **kw):
    section = load_recipe(RECIPE, ["pretrain.train_res=32", "pretrain.test_res=32",
                                   "pretrain.steps=4", "pretrain.epochs=null",
                                   "pretrain.warmup_steps=1", "pretrain.warmup_epochs=null",
                                   "pretrain.global_batch=32", "pretrain.micro_batch=16",
                                   "pretrain.loader.num_workers=0",
                                   "pretrain.trackers=[]", *overrides]).pretrain
    return tiny_pretrain_job(section, shards, out, **kw)


@pytest.mark.integration
def test_a_split_named_validation_validates_the_run(demo_shards, tmp_path):
    """HF datasets call the held-out split "validation": shards of it are used as "val"."""
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards["pretrain"], shards)
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["validation"] = info["splits"].pop("val")
    (shards / "_info.json").write_text(json.dumps(info))
    result = train.run(_job(shards, tmp_path / "run"))
    assert "val_top1_raw" in result.metrics() and "val_nll_ema" in result.metrics()


@pytest.mark.integration
def test_the_phases_by_name_and_the_typed_result(demo_shards, tmp_path):
    """Trainer -> resume -> train -> finish, called one by one as `run` does; the result is a
    TrainResult (metrics only: no model, no accelerator in it); the engine writes the stage's
    config.json as it is."""
    job = _job(demo_shards["pretrain"], tmp_path, ["pretrain.checkpoint_every=2"],
               sample_log=tmp_path / "keys")
    with RunControl() as control:
        t = train.Trainer(job, control)
        assert t.plan is job.plan and t.step == 0
        assert t.resume() is None                                # nothing to resume yet
        t.train()
    result = t.finish()
    assert isinstance(result, train.TrainResult) and result.steps == 4
    assert set(result.val) == {"ema", "raw"}                     # the demo shards have a val split
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == pytest.approx(result.metrics())
    assert {"steps", "train_loss", "val_top1_ema", "val_nll_raw"} <= set(metrics)
    assert "compile_s" not in metrics                            # compile off
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == job.config.to_dict()
    lines = (tmp_path / "keys" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 0, 1, 1, 2, 2, 3, 3]   # 2 micro-batches

    # a second trainer of the same job finds the step-4 checkpoint in its resume phase
    with RunControl() as control:
        again = train.Trainer(_job(demo_shards["pretrain"], tmp_path,
                                   ["pretrain.checkpoint_every=2"]), control)
        found = again.resume()
    assert found is not None and found.name == "step-00000004" and again.step == 4
    assert again.cursor.offset > 0 or again.cursor.epoch > 0


def test_resume_from_a_folder_that_is_not_a_checkpoint_names_the_complete_ones(demo_shards,
                                                                              tmp_path):
    with RunControl() as control:
        t = train.Trainer(_job(demo_shards["pretrain"], tmp_path, resume=str(tmp_path / "nope")),
                          control)
        with pytest.raises(CheckpointError, match="not a complete checkpoint folder"):
            t.resume()


def test_train_mode_freezes_bn_statistics_only_where_asked():
    model, _, _ = build_model("tiny_bn", 5)
    train_mode(model, freeze_bn=False)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    train_mode(model, freeze_bn=True)
    assert model.training and not any(m.training for m in bns)


def test_result_metrics_hold_numbers_only():
    plan = make_plan(load_recipe(RECIPE).pretrain, 1000, 1)
    r = train.TrainResult(10, 1.5, 100.0, 3.0, 0, 500.0, 0, plan,
                          val={"ema": {"top1": 90.0, "nll": 0.3}}, compile_s=12.5)
    m = r.metrics()
    assert m["val_top1_ema"] == 90.0 and m["compile_s"] == 12.5
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_a_step_waiting_for_data_gets_one_line_saying_what_to_raise():
    loader = load_recipe(RECIPE).pretrain.loader
    assert train.data_wait_hint(0.2, "pretrain", loader, (6, 10)) is None
    line = train.data_wait_hint(0.6, "pretrain", loader, (6, 10))
    assert "waited for data 60% of the time (steps 6-10)" in line
    assert "pretrain.loader.num_workers (now 1)" in line and "loader.decode=device" in line
    device = dataclasses.replace(loader, decode="device")
    assert "decode=device" not in train.data_wait_hint(0.6, "finetune", device, (1, 2))


@pytest.mark.integration
def test_a_run_whose_step_waits_for_data_says_so_once(demo_shards, tmp_path):
    """DeepMind's examples made in the training process itself (no loader workers) for a tiny
    net: the step waits for its data most of the time; the run says so once and records it."""
    p = run_stage_in_process(
        "pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]), "--out",
        str(tmp_path), "pretrain.train_res=48", "pretrain.steps=10", "pretrain.epochs=null",
        "pretrain.warmup_steps=1", "pretrain.warmup_epochs=null", "pretrain.log_every=2",
        "pretrain.eval_every=0", "pretrain.trackers=[]", "pretrain.loader.num_workers=0",
        "pretrain.augment.randaugment_layers=4", "pretrain.augment.randaugment_magnitude=5",
        "pretrain.augment.mixup_alpha=0.2", "pretrain.augment.cutmix_alpha=1.0",
        "pretrain.augment.mix_pairs=disjoint", "pretrain.augment.randaugment_order=after_mix")
    said = [ln for ln in (p.stdout + p.stderr).splitlines() if "waited for data" in ln]
    assert len(said) == 1 and "pretrain.loader.num_workers (now 0)" in said[0]   # measured 45%
    assert json.loads((tmp_path / "metrics.json").read_text())["data_wait_share"] > 0.25
