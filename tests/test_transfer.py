"""pipeline/transfer.py without training: where fine-tuning starts from, the head kept or replaced,
frozen modules, the weights-fit check, and the lineage and resolution notes for the log."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run, run_stage, tiny_model_dir
from pipeline.model_config import ModelConfig, ModelError
from pipeline.recipe import load_recipe
from pipeline.transfer import (
    build_finetune_model,
    finetune_lineage,
    freeze,
    head_name,
    load_init,
    resolution_note,
)
from pipeline.variants import build_model

RECIPE = ROOT / "recipes" / "demo.yaml"


def section(*overrides):
    return load_recipe(RECIPE, list(overrides)).finetune


def test_same_labels_keep_the_head_other_labels_get_a_zero_head(tmp_path):
    folder = tiny_model_dir(tmp_path / "model")                       # labels 5..9, EMA != raw
    src = load_init(str(folder), "raw")
    kept, messages = build_finetune_model(src, list("56789"), section())
    assert torch.equal(kept.head.fc.weight, src.state["head.fc.weight"])
    assert any(m.startswith("head kept (head.fc)") for m in messages)
    new, messages = build_finetune_model(src, list("abc"), section())
    assert new.head.fc.weight.shape == (3, 256) and not new.head.fc.weight.any()
    assert any("new head (head.fc, 3 classes)" in m for m in messages)
    assert torch.equal(new.stem.conv1.weight, src.state["stem.conv1.weight"])   # body loaded


def test_weights_that_do_not_fit_name_the_file_and_the_tensors(tmp_path):
    folder = tiny_model_dir(tmp_path / "model")
    model, _, _ = build_model("tiny", 5, seed=0)
    state = {k: v for k, v in model.state_dict().items() if k != "stem.conv1.weight"}
    state["stem.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(ModelError, match=r"do not fit.*wrong shape \['stem.conv1.weight"):
        build_finetune_model(load_init(str(folder)), list("56789"), section())


def test_freeze_stops_gradients_under_the_prefixes_and_names_the_modules_otherwise():
    model, _, _ = build_model("tiny", 5)
    count = freeze(model, ["stem", "stages.0"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in frozen) > 0
    assert all(n.startswith(("stem.", "stages.0.")) for n in frozen)
    with pytest.raises(ValueError, match="no parameters under 'stages.9'.*stem, stages.0"):
        freeze(model, ["stages.9"])
    assert head_name(model) == "head.fc"


def test_lineage_keeps_the_init_facts_and_drops_its_run_identity():
    init_config = ModelConfig.from_dict(
        {"architecture": "dm_nfnet_f0", "num_classes": 5, "pretrained_cfg": {"input_size": [3, 48, 48]},
         "nfnet_pipeline": {"variant": "tiny", "stage": "pretrain", "step": 337, "fingerprint": "abc",
                            "recipe": "demo"}})
    lineage = finetune_lineage(init_config, "runs/pretrain/model", "ema", "demo")
    assert lineage == {"variant": "tiny", "recipe": "demo", "init": "runs/pretrain/model",
                       "init_weights": "ema", "init_res": 48}


def test_resolution_note_says_when_fine_tuning_does_not_raise_the_resolution():
    cfg = ModelConfig.from_dict({"architecture": "dm_nfnet_f0", "num_classes": 5,
                                 "pretrained_cfg": {"input_size": [3, 48, 48]}})
    up = resolution_note(cfg, section("finetune.train_res=64"))
    assert up == "resolution: pretrained at 48 px -> fine-tuning at 64 px, testing at 64 px"
    same = resolution_note(cfg, section("finetune.train_res=48"))
    assert same.endswith("(not above the pretraining resolution: the paper's transfer raises it)")
    unknown = ModelConfig(architecture="dm_nfnet_f0", num_classes=5)     # no input_size recorded
    assert resolution_note(unknown, section()) is None


def hub_cache(root, repo: str, folder) -> dict:
    """`folder` (config.json + model.safetensors) as a model repo in a Hugging Face cache at
    `root`, laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/); returns the
    environment that reads only that cache."""
    import shutil
    commit = "3c0ffee" + "0" * 33
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snap / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "HF_HOME": str(root / "home")}


@pytest.mark.integration
def test_hub_init_reads_an_offline_cache_and_names_a_missing_model(tmp_path, demo_shards):
    folder = tiny_model_dir(tmp_path / "model")
    env = hub_cache(tmp_path / "hf", "test-org/tiny-nfnet", folder)
    code = (
        "import json, sys; from pipeline.transfer import load_init; "
        "src = load_init(sys.argv[1]); "
        "print(json.dumps([src.config.architecture, src.config.num_classes, "
        "src.weights_label, float(src.state['head.fc.weight'].abs().sum())]))")
    p = run([sys.executable, "-c", code, "hf-hub:test-org/tiny-nfnet"], env=env)
    arch, classes, label, head = json.loads(p.stdout.strip().splitlines()[-1])
    want = load_file(str(folder / "model.safetensors"))["head.fc.weight"].abs().sum().item()
    assert (arch, classes) == ("dm_nfnet_f0", 5) and label.startswith("hf-hub:test-org/tiny-nfnet@3c0ffee")
    assert head == pytest.approx(want)
    p = run_stage("finetune", "--recipe", str(RECIPE), "--init", "hf-hub:test-org/not-there",
                  "--shards", str(demo_shards["finetune"]), "--out", str(tmp_path / "run"),
                  env=env, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "hf-hub:test-org/not-there: it is not in the Hugging Face cache" in p.stderr
    assert "HF_HUB_OFFLINE=1" in p.stderr and "hf download test-org/not-there" in p.stderr
    assert not (tmp_path / "run").exists()
