"""Checks that need a CUDA device (`pytest -m gpu`): bf16 training through the real stage, the
nvJPEG data path, and AGC's share of an F0 step. Deselected by default; skipped without CUDA."""
import json

import pytest
import torch

from conftest import ROOT, run_stage
from pipeline.model_config import ModelConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
RECIPE = str(ROOT / "recipes" / "demo.yaml")


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_bf16_pretrain_and_resume_on_gpu(demo_shards, tmp_path, decode):
    args = ["--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]), "--out", str(tmp_path),
            "pretrain.epochs=2", "pretrain.checkpoint_every=5", f"pretrain.loader.decode={decode}"]
    run_stage("pretrain", *args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val_top1_ema"] > 30 and metrics["peak_mem_mb"] > 0
    config = ModelConfig.load(tmp_path / "model")
    assert config.lineage["mixed_precision"] == "bf16"     # the run's accelerator
    again = run_stage("pretrain", *args, "pretrain.epochs=2")     # complete: resumes at the end
    assert "resumed from" in again.stdout


def test_the_training_accelerator_runs_the_model_in_bf16():
    """What `mixed_precision: bf16` means in the step: inside the accelerator's autocast the convs
    compute in bfloat16 (the loss is taken in float32 from the logits)."""
    from pipeline.runtime import make_accelerator
    from pipeline.variants import build_model
    acc = make_accelerator("auto")
    assert acc.mixed_precision == "bf16"
    model, _, _ = build_model("tiny", 5)
    model = model.to(acc.device)
    seen = []
    model.stem.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with acc.autocast():
        logits = model(torch.randn(2, 3, 32, 32, device=acc.device))
    assert seen == [torch.bfloat16] and logits.dtype == torch.bfloat16


def test_agc_costs_under_2_percent_of_an_f0_step():
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import step_bench
    row = step_bench("ours", "f0", 192, 256, torch.device("cuda"), True, False, iters=10, warmup=3,
                     peak_tflops=790.0)
    assert row["agc_pct"] <= 2.0, row
