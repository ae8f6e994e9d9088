"""`compile: true` (torch.compile of the model for training and evaluation) on a tiny NFNet.

The inductor test compiles for real (dynamo + AOTAutograd + inductor's C++ code generation): on
this 2-core CPU that takes ~5 minutes per process for training and as long again for the eval
graphs, so it is `slow` (pytest -m slow). The default suite runs the same checks with dynamo's
graph capture only (NFNET_COMPILE_BACKEND=eager; ~15 s): every step still goes through the
compiled wrapper, and what the wrapper must not change (losses, checkpoint and published names,
resume) is checked the same way.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import ONE_THREAD, ROOT, run_stage

pytestmark = pytest.mark.integration   # torch.compile'd training runs of the stage

RECIPE = str(ROOT / "recipes" / "demo.yaml")
RUN = ["pretrain.steps=6", "pretrain.epochs=null", "pretrain.warmup_steps=2",
       "pretrain.warmup_epochs=null", "pretrain.global_batch=32", "pretrain.micro_batch=32",
       "pretrain.train_res=32", "pretrain.test_res=32", "pretrain.loader.num_workers=0",
       "pretrain.log_every=1", "pretrain.eval_every=0", "pretrain.lr_base=4.0"]


def losses(out):
    with open(out / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]


def compiled_run(shards, out, backend, *extra):
    return run_stage("pretrain", "--recipe", RECIPE, "--shards", str(shards), "--out", str(out),
                     *RUN, "pretrain.compile=true", *extra, timeout=1800,
                     env={**ONE_THREAD, "NFNET_COMPILE_BACKEND": backend})


def check_compiled_against_eager(shards, tmp_path, backend, tolerance):
    eager = tmp_path / "eager"
    run_stage("pretrain", "--recipe", RECIPE, "--shards", str(shards), "--out", str(eager), *RUN,
              env=ONE_THREAD)
    comp = tmp_path / "compiled"
    compiled_run(shards, comp, backend)
    metrics = json.loads((comp / "metrics.json").read_text())
    assert metrics["compile_s"] > 0 and "compile_s" not in json.loads(
        (eager / "metrics.json").read_text())
    assert losses(comp) == pytest.approx(losses(eager), abs=tolerance)
    # checkpoints and the model folder hold the plain module's names, not the wrapper's
    state = load_file(str(comp / "model" / "model.safetensors"))
    assert state.keys() == load_file(str(eager / "model" / "model.safetensors")).keys()
    assert not any("_orig_mod" in k for k in state)
    return comp


def test_compile_with_dynamo_keeps_losses_names_and_metrics(demo_shards, tmp_path):
    check_compiled_against_eager(demo_shards["pretrain"], tmp_path, "eager", 1e-6)


@pytest.mark.slow
def test_compile_with_inductor_matches_eager_and_resumes(demo_shards, tmp_path):
    """Inductor fuses and reorders float operations: the losses of 6 steps agree with eager
    within 1e-4. A SIGTERM after step 3 stops the compiled run; the resumed (recompiled) run
    finishes with the weights of an uninterrupted compiled run."""
    shards = demo_shards["pretrain"]
    full = check_compiled_against_eager(shards, tmp_path, "inductor", 1e-4)
    cut = tmp_path / "cut"
    cmd = [sys.executable, ROOT / "stages" / "pretrain.py", "--recipe", RECIPE, "--shards", shards,
           "--out", cut, *RUN, "pretrain.compile=true", "--sample-log", tmp_path / "keys"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ONE_THREAD,
                                            "NFNET_COMPILE_BACKEND": "inductor"})
    deadline = time.time() + 1500
    while time.time() < deadline:
        log = tmp_path / "keys" / "rank0.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=600)
    assert proc.returncode == 75
    resumed = compiled_run(shards, cut, "inductor")
    assert "resumed from" in resumed.stdout
    a, b = load_file(str(full / "model" / "model.safetensors")), \
        load_file(str(cut / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
