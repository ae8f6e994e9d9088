"""The BN baseline through the real stages (recipes/demo_bn.yaml at tiny size), and batch norm done
right: SyncBatchNorm without CUDA warns and still trains, small per-device batches warn, frozen BN
statistics stay bit-identical through fine-tuning, and evaluation is always in eval mode."""
import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_stage_in_process, torchrun
from pipeline.data.manifest import load_split
from pipeline.evaluate import eval_settings, predict
from pipeline.model_config import ModelConfig
from pipeline.model_dir import load_model_dir
from pipeline.variants import build_model, has_batchnorm

pytestmark = pytest.mark.integration   # the BN demo through the stages, torchrun

RECIPE = str(ROOT / "recipes" / "demo_bn.yaml")
# lr_base 1.2 (3x the demo's): 22 steps then learn enough for an accuracy floor above chance
TINY = ["pretrain.epochs=1", "pretrain.warmup_epochs=0.25", "pretrain.train_res=32", "pretrain.test_res=32",
        "pretrain.global_batch=32", "pretrain.micro_batch=32", "pretrain.eval_every=0",
        "pretrain.log_every=5", "pretrain.lr_base=1.2"]
TINY_FT = ["finetune.epochs=1", "finetune.warmup_epochs=0.25", "finetune.train_res=40",
           "finetune.test_res=40",
           "finetune.global_batch=32", "finetune.micro_batch=32", "finetune.eval_every=0",
           "finetune.log_every=5"]
SMALL_BATCH = "batch norm statistics come from"
NO_SYNC = "model.sync_bn needs CUDA"
STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def bn(demo_raw, tmp_path_factory):
    """shard -> pretrain -> finetune (bn_stats train and freeze) -> evaluate -> publish, demo_bn."""
    root = tmp_path_factory.mktemp("bn")
    out = {"root": root}
    for part in ("pretrain", "finetune"):
        run_stage_in_process("shard", "--recipe", RECIPE, "--source", str(demo_raw / part),
                             "--out", str(root / "shards" / part), "--workers", "1", "--quiet",
                             "shard.shard_size=64", "shard.max_size=48")
    shards = root / "shards"
    out["pretrain"] = run_stage_in_process("pretrain", "--recipe", RECIPE, "--shards",
                                           str(shards / "pretrain"), "--out", str(root / "pretrain"),
                                           *TINY)
    for mode in ("train", "freeze"):
        out[f"finetune_{mode}"] = run_stage_in_process(
            "finetune", "--recipe", RECIPE, "--init", str(root / "pretrain" / "model"),
            "--shards", str(shards / "finetune"), "--out", str(root / f"finetune_{mode}"),
            *TINY_FT, f"finetune.model.bn_stats={mode}")
    model = str(root / "finetune_train" / "model")
    out["evaluate"] = run_stage_in_process(
        "evaluate", "--recipe", RECIPE, "--model", model, "--shards", str(shards / "finetune"),
        "--out", str(root / "evaluate"), "evaluate.batch=50")
    out["publish"] = run_stage_in_process(
        "publish", "--recipe", RECIPE, "--model", model, "--metrics",
        str(root / "evaluate" / "metrics.json"), "--out", str(root / "publish"))
    return out


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_demo_bn_is_the_demo_recipe_but_for_the_model():
    """Equal budget: every key of recipes/demo.yaml is the same in demo_bn but the model, the
    clipping (BN baselines train unclipped) and the names."""
    import yaml
    nf = _flat(yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text()))
    bn = _flat(yaml.safe_load((ROOT / "recipes" / "demo_bn.yaml").read_text()))
    differ = {k for k in nf.keys() | bn.keys() if nf.get(k, "absent") != bn.get(k, "absent")}
    allowed = {"name", "description", "pretrain.model.variant", "pretrain.clip_factor",
               "finetune.clip_factor", "publish.model_name", "publish.tags",
               "pretrain.model.sync_bn", "finetune.model.sync_bn", "finetune.model.bn_stats"}
    assert differ <= allowed, sorted(differ - allowed)
    assert bn["pretrain.model.variant"] == "tiny_bn" and bn["pretrain.clip_factor"] is None


def _bn_keys(state):
    return sorted(k for k in state if k.endswith(STATS))


def test_demo_bn_runs_through_the_five_stages(bn):
    root = bn["root"]
    config = ModelConfig.load(root / "pretrain" / "model")
    assert config.architecture == "resnet18" and config.model_args["layers"] == [1, 1, 1, 1]
    model, _ = load_model_dir(root / "pretrain" / "model", "ema")
    assert has_batchnorm(model) and model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert SMALL_BATCH not in bn["pretrain"].stdout and NO_SYNC not in bn["pretrain"].stdout
    pre = json.loads((root / "pretrain" / "metrics.json").read_text())
    assert pre["steps"] == 22 and pre["peak_mem_mb"] > 0
    # measured 27.2 (EMA) and 34.4 (raw) on digits 0-4 (chance 20) after 22 steps
    assert pre["val_top1_ema"] >= 23 and pre["val_top1_raw"] >= 28
    assert "new head" in bn["finetune_train"].stdout
    ev = json.loads((root / "evaluate" / "metrics.json").read_text())
    assert ev["num_samples"] == 179 and ev["weights"] == "ema" and ev["top1"] > 20   # chance: 20
    card = (root / "publish" / "README.md").read_text()
    assert "library_name: timm" in card and "resnet-tiny-bn-digits" in card


def test_publish_folder_loads_in_timm_with_the_same_logits(bn):
    folder = bn["root"] / "publish"
    ours, _ = load_model_dir(bn["root"] / "finetune_train" / "model", "ema")
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert set(load_file(str(folder / "model.safetensors"))) == set(ours.state_dict())
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    assert _bn_keys(theirs.state_dict())                # running statistics travel with the weights


def test_frozen_bn_statistics_are_bit_identical_after_finetuning(bn):
    init = load_file(str(bn["root"] / "pretrain" / "model" / "ema.safetensors"))  # init.weights: ema
    keys = _bn_keys(init)
    assert len(keys) == 3 * 13          # stem BN + 4 blocks x (2 + 1 in the downsample shortcut)
    frozen = {w: load_file(str(bn["root"] / "finetune_freeze" / "model" / f"{w}.safetensors"))
              for w in ("model", "ema")}
    trained = load_file(str(bn["root"] / "finetune_train" / "model" / "model.safetensors"))
    for k in keys:
        assert torch.equal(frozen["model"][k], init[k]), k
        assert torch.equal(frozen["ema"][k], init[k]), k
    moved = [k for k in keys if k.endswith(("running_mean", "running_var"))
             and not torch.equal(trained[k], init[k])]
    assert len(moved) == 2 * 13                         # bn_stats: train updates every BN layer
    # the rest of the network trains in both modes: every conv weight and BN affine moved
    learned = [k for k in init if k not in keys and not k.startswith("fc.")]
    assert learned and all(not torch.equal(frozen["model"][k], init[k]) for k in learned)
    assert all(not torch.equal(trained[k], init[k]) for k in learned)


def test_evaluation_is_in_eval_mode_whatever_the_batch(bn):
    """The evaluate stage's `predict`, handed a BN model in train mode (as the trainer's mid-run
    validation does): eval mode, running statistics untouched, and each image's prediction the
    same alone (batch 1) as among 36 others (batch 37)."""
    model, config = load_model_dir(bn["root"] / "finetune_train" / "model", "ema")
    split = load_split(bn["root"] / "shards" / "finetune", "val")
    transform = eval_settings(config).transform()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(workers=0, device=torch.device("cpu"))
    model.train()                                       # as the trainer hands it over mid-run
    alone = predict(model, split, transform, batch=1, **common)
    assert not model.training                           # predict switched to eval mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # stats untouched
    mixed = predict(model, split, transform, batch=37, **common)
    assert len(alone.nll) == 179 and (alone.top5 == mixed.top5).all()
    ev = json.loads((bn["root"] / "evaluate" / "metrics.json").read_text())     # the stage: batch 50
    assert ev["nll"] == pytest.approx(float(alone.nll.mean()), rel=1e-5)
    torch.testing.assert_close(torch.from_numpy(alone.nll), torch.from_numpy(mixed.nll),
                               rtol=1e-5, atol=1e-6)

    # the control: in train mode an image's logits depend on the rest of its batch
    x = torch.randn(8, 3, 40, 40)
    with torch.no_grad():
        model.eval()
        eval_alone, eval_batch = model(x[:1]), model(torch.cat([x[:1], 5 * x[1:]]))[:1]
        model.train()
        train_a, train_b = model(x[:2]), model(torch.cat([x[:1], 5 * x[1:]]))
    torch.testing.assert_close(eval_alone, eval_batch, rtol=1e-5, atol=1e-5)
    assert (train_a[0] - train_b[0]).abs().max() > 1e-2


def test_sync_bn_without_cuda_warns_and_still_trains_on_two_processes(bn, tmp_path):
    """torchrun gives a 2-process gloo group on CPU: SyncBatchNorm needs CUDA, so the engine says
    so (once) and trains with per-process statistics; 8 images per device also warns."""
    out = tmp_path / "run"
    p = torchrun(2, "stages/pretrain.py", "--recipe", RECIPE,
                 "--shards", str(bn["root"] / "shards" / "pretrain"), "--out", str(out),
                 "pretrain.model.sync_bn=true", "pretrain.global_batch=16", "pretrain.micro_batch=8",
                 "pretrain.steps=6", "pretrain.epochs=null", "pretrain.warmup_steps=1",
                 "pretrain.warmup_epochs=null", "pretrain.train_res=32", "pretrain.test_res=32",
                 "pretrain.eval_every=0", "pretrain.trackers=[]", timeout=300)
    assert p.stdout.count(NO_SYNC) == 1                 # printed by the main process only
    assert p.stdout.count(f"{SMALL_BATCH} 8 images per forward pass") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and math.isfinite(metrics["train_loss"])
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "processes: 2" in resolved and "sync_bn: true" in resolved
    # the saved weights are a plain BN model's: the same names and shapes as a freshly built
    # tiny_bn (no SyncBatchNorm wrapper, no DDP "module." prefix), statistics updated by training
    state = load_file(str(out / "model" / "model.safetensors"))
    fresh, _, _ = build_model("tiny_bn", 5)
    assert {k: tuple(v.shape) for k, v in state.items()} == \
        {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    steps = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert steps and all(int(v) == 6 for v in steps)           # 6 steps x 1 micro-batch each
