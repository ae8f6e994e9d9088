"""Checkpoints survive crashes; a NaN loss stops training with the last good checkpoint intact."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_stage_in_process
from pipeline import checkpoint as ckpt
from pipeline.files import WriteError
from pipeline.variants import build_model

RECIPE = str(ROOT / "recipes" / "demo.yaml")


def _state(step):
    return {"step": step, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            "cursor": {"epoch": 0, "offset": step, "num_streams": 1, "segments": None}}


def test_atomic_save_keeps_the_last_k_and_ignores_partial_folders(tmp_path):
    model, _, _ = build_model("tiny", 5, seed=0)
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, model, model, _state(step), {"fingerprint": "x"}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    # a crash mid-save leaves a temporary folder (and possibly no meta.json): never picked
    (tmp_path / ".step-00000040.abc.tmp").mkdir()
    (tmp_path / "step-00000050").mkdir()                     # renamed but without meta.json
    assert ckpt.complete_checkpoints(tmp_path)[-1].name == "step-00000030"
    state, meta = ckpt.load_checkpoint(tmp_path / "step-00000030", model, None)
    assert state["cursor"]["offset"] == 30 and meta["step"] == 30


def test_a_failure_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, _, _ = build_model("tiny", 5, seed=0)
    ckpt.save_checkpoint(tmp_path, 10, model, None, _state(10), {}, keep=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-00000010").iterdir()}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError, match="the checkpoint of step 20"):   # one line (test_files.py)
        ckpt.save_checkpoint(tmp_path, 20, model, None, _state(20), {}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000010"]     # no debris, old kept
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-00000010").iterdir()} == before


def test_train_state_loads_without_unpickling_code(tmp_path):
    model, _, _ = build_model("tiny", 5, seed=0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, None, _state(1), {}, keep=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"step": 1, "x": Evil()}, path / "train_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ckpt.load_checkpoint(path, model, None)


@pytest.mark.integration
def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(demo_shards, tmp_path):
    out = tmp_path / "run"
    p = run_stage_in_process(
        "pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]), "--out", str(out),
        "pretrain.train_res=32", "pretrain.test_res=32", "pretrain.epochs=3",
        "pretrain.checkpoint_every=2", "pretrain.log_every=1", "pretrain.clip_factor=null",
        "pretrain.lr_base=1.0e+6", "pretrain.warmup_epochs=0.1", check=False)
    assert p.returncode != 0
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "became NaN or infinite at step" in p.stderr and "is untouched" in p.stderr
    assert not (out / "model").exists()                       # no final model from a diverged run
    for c in ckpt.complete_checkpoints(next((out / "checkpoints").iterdir())):
        weights = load_file(str(c / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), c


@pytest.mark.integration
def test_nan_policy_skip_finishes_and_counts(demo_shards, tmp_path):
    """lr 1e6 without clipping: the first real step blows the loss up and later steps are dropped;
    the run still ends, counts them, and never writes a non-finite weight. log_every 100 makes the
    one log window the whole run, so train_loss averages the finite steps (it must be finite)."""
    out = tmp_path / "run"
    run_stage_in_process(
        "pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]), "--out", str(out),
        "pretrain.train_res=32", "pretrain.test_res=32", "pretrain.epochs=2",
        "pretrain.nan_policy=skip", "pretrain.clip_factor=null", "pretrain.lr_base=1.0e+6",
        "pretrain.warmup_epochs=0.1", "pretrain.ema_decay=null", "pretrain.log_every=100")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 22 and 0 < metrics["skipped_steps"] < 22
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
