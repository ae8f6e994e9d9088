"""Writes that fail for want of space or permission, on real filesystems filled for the purpose
(a small tmpfs): one line naming the path, what was written and the bytes it needs; nothing
half-written left where a reader would take it for complete. The atomic writes themselves:
tests/test_checkpoint.py; the publish stage on a read-only folder: tests/test_publish.py."""
import json
import subprocess

import pytest
import torch

from conftest import ROOT, fill, run_stage_in_process
from pipeline import checkpoint as ckpt
from pipeline.files import WriteError, atomic_write_text
from pipeline.model_config import ModelConfig
from pipeline.model_dir import save_model_dir, tensor_bytes
from pipeline.variants import build_model

RECIPE = str(ROOT / "recipes" / "demo.yaml")


def _state(step: int) -> dict:
    return {"step": step, "optimizer": {"state": {"0": {"momentum": torch.zeros(40_000)}}},
            "cursor": {"epoch": 0, "offset": step}}


def test_a_disk_that_fills_in_the_middle_of_a_checkpoint_leaves_the_previous_one(
        small_filesystem):
    """Room for the tensors but not for the files' headers: the check before writing passes,
    the write itself fails (safetensors' Rust error, os error 28) and becomes one line."""
    root = small_filesystem("3m") / "checkpoints"
    model, _, _ = build_model("tiny", 5, seed=0)
    ckpt.save_checkpoint(root, 10, model, model, _state(10), {}, keep=2)
    before = {p.name: p.read_bytes() for p in (root / "step-00000010").iterdir()}
    needs = tensor_bytes([model.state_dict()] * 2) + tensor_bytes(_state(20))
    fill(root.parent, needs + 4096)
    with pytest.raises(WriteError) as e:
        ckpt.save_checkpoint(root, 20, model, model, _state(20), {}, keep=2)
    message = str(e.value)
    assert "\n" not in message and str(root / "step-00000020") in message
    assert "the checkpoint of step 20" in message and "no space left" in message
    assert "it needs" in message and "free there" in message
    assert [p.name for p in root.iterdir()] == ["step-00000010"]          # no debris
    assert {p.name: p.read_bytes() for p in (root / "step-00000010").iterdir()} == before


def test_a_model_folder_too_big_for_the_disk_is_refused_before_writing(small_filesystem):
    out = small_filesystem("1m") / "model"
    model, _, _ = build_model("tiny", 5, seed=0)
    with pytest.raises(WriteError, match=r"could not write the model folder to .*/model: no space "
                                         r"left on the device \(ENOSPC\); it needs 1\.2 MiB, 1\.0 MiB free"):
        save_model_dir(out, model, model, ModelConfig(architecture="x", num_classes=5))
    assert not list(out.parent.glob("*model*"))


def test_a_read_only_folder_is_one_line(small_filesystem):
    folder = small_filesystem("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    with pytest.raises(WriteError, match=r"metrics.json to .*: read-only filesystem \(EROFS\).*"
                                         r"make it writable or write elsewhere"):
        atomic_write_text(folder / "metrics.json", "{}")


@pytest.mark.integration
def test_a_full_disk_stops_training_with_one_line_and_the_last_checkpoint(demo_shards,
                                                                          small_filesystem):
    """The pretrain stage writing into a 3 MiB filesystem: the step-3 checkpoint (2 MB) fits,
    the step-6 one does not. Exit 1, one line, the step-3 checkpoint complete, nothing else."""
    out = small_filesystem("3m") / "run"
    p = run_stage_in_process(
        "pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]), "--out", str(out),
        "pretrain.epochs=1", "pretrain.warmup_epochs=0.5", "pretrain.train_res=32",
        "pretrain.test_res=32", "pretrain.micro_batch=32", "pretrain.eval_every=0", "pretrain.trackers=[]",
        "pretrain.checkpoint_every=3", "pretrain.keep_checkpoints=2", check=False, threads=1)
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("pretrain:")]
    assert len(errors) == 1 and errors[0].startswith("error: could not write the checkpoint of "
                                                     "step 6 to ") and "Traceback" not in p.stderr
    assert "step-00000006: no space left on the device (ENOSPC); it needs" in errors[0]
    root = next((out / "checkpoints").iterdir())
    assert [c.name for c in root.iterdir()] == ["step-00000003"]
    assert json.loads((root / "step-00000003" / "meta.json").read_text())["step"] == 3
    assert not (out / "model").exists() and not (out / "run.lock").exists()


@pytest.mark.integration
def test_shards_on_a_full_disk_are_one_line_and_no_manifest(demo_raw, small_filesystem):
    out = small_filesystem("64k") / "shards"           # less than the first shard
    p = run_stage_in_process("shard", "--recipe", RECIPE, "--source", str(demo_raw / "pretrain"),
                             "--out", str(out), "--workers", "1", "--quiet",
                             "shard.shard_size=64", "shard.max_size=48", check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert errors[0].startswith("error: could not write shard train-000000.tar (")
    assert "(ENOSPC); it needs " in errors[0] and "KiB free there" in errors[0]
    assert not (out / "_info.json").exists() and not list(out.glob(".*.tmp"))
