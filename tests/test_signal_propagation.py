"""Signal propagation at initialisation (pipeline/signal_propagation.py, stages/signal_report.py).

The NF design (Brock, De & Smith 2021): block j of a stage outputs variance 1 + (j + 1) alpha^2,
reset at each transition block. Measured here on a tiny NFNet with several blocks per stage
(depths 4, 3, 3, 2; widths of the `tiny` variant; seed 0; 64 images at 48 px), skip gains set
to 1 (as built they are 0 and every block is an identity):

- on N(0,1) input (the idealised input the design assumes; unit variance into the first stage,
  whose transition does not pool): stage 0 resets to 0.92 (design 1.04) and grows by
  +0.040, +0.044, +0.029 per block (design alpha^2 = 0.04; seeds 0-2 gave 0.029-0.044). Tolerances:
  transition in [0.8, 1.2], every increment in [0.5, 1.5] alpha^2, their mean within 25% of
  alpha^2. Later transitions reset to ~0.25 of the level before them: the transition shortcut
  average-pools (2x2, DeepMind's and timm's) activations that are nearly uncorrelated between
  neighbouring pixels at init, which divides their variance by up to 4; inside those stages each
  block still adds a positive increment, smaller than alpha^2 times the stage's level.
- on real digit images from shards, the stem's weight-standardised convs remove most of the smooth,
  grey-level content (zero-mean filters), so every level is ~100x lower (0.0034 after stage 0's
  transition), but the shape holds: each transition drops the variance (<= 0.6x), and with the
  gains as built every non-transition block is an exact identity.
"""
import json
from itertools import pairwise

import pytest
import timm
import torch

from conftest import ROOT, run_stage_in_process
from pipeline.signal_propagation import (
    branch_gains,
    gaussian_like,
    image_batch,
    measure,
    predicted_variance,
    residual_blocks,
    signal_metrics,
    summarise,
)
from pipeline.variants import VARIANTS, build_model

ALPHA2 = 0.2 ** 2
DEPTHS = [4, 3, 3, 2]


@pytest.fixture(scope="module")
def images(demo_shards):
    x, labels = image_batch(demo_shards["pretrain"], "train", 64, 48)
    assert x.shape == (64, 3, 48, 48) and len(set(labels)) == 5       # real, mixed digits
    return x


@pytest.fixture(scope="module")
def deep_tiny():
    args = dict(VARIANTS["tiny"].arch_overrides, depths=DEPTHS)
    torch.manual_seed(0)
    return timm.create_model("dm_nfnet_f0", num_classes=5, **args)


def test_signal_metrics_are_deepminds():
    x = torch.zeros(2, 3, 1, 2)
    x[:, 0] = 2.0                                      # channel 0: mean 2, var 0
    x[0, 1, 0, 0], x[1, 1, 0, 1] = 1.0, -1.0           # channel 1: mean 0, var 0.5
    sq_mean, var = signal_metrics(x)
    assert sq_mean == pytest.approx(4.0 / 3) and var == pytest.approx(0.5 / 3)


def test_blocks_stages_and_prediction(deep_tiny):
    blocks = residual_blocks(deep_tiny)
    assert [n for n, *_ in blocks][:5] == ["stages.0.0", "stages.0.1", "stages.0.2", "stages.0.3",
                                          "stages.1.0"]
    assert [s for *_, s, _ in blocks] == [0] * 4 + [1] * 3 + [2] * 3 + [3] * 2
    positions = [p for *_, p in blocks]
    assert predicted_variance(positions, 0.2)[:5] == pytest.approx([1.04, 1.08, 1.12, 1.16, 1.04])
    bn, _, _ = build_model("tiny_bn", 5, seed=0)
    assert [n for n, *_ in residual_blocks(bn)] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert float(bn.layer1[0].bn2.weight.detach().abs().sum()) == 0          # timm's zero_init_last
    assert branch_gains(bn, 1.0) == 4 and float(bn.layer1[0].bn2.weight.detach().min()) == 1.0


def test_nf_variance_grows_by_alpha_squared_and_resets(deep_tiny, images):
    before = {k: v.clone() for k, v in deep_tiny.state_dict().items()}
    curve = measure(deep_tiny, gaussian_like(images), "tiny", "gaussian", gains=1.0)
    assert all(torch.equal(before[k], v) for k, v in deep_tiny.state_dict().items())  # a copy
    stages = summarise(curve)
    s0 = stages[0]
    assert 0.8 <= s0["transition_var"] <= 1.2                        # design: 1 + alpha^2
    assert all(0.5 * ALPHA2 <= d <= 1.5 * ALPHA2 for d in s0["increments"]), s0["increments"]
    assert s0["mean_increment"] == pytest.approx(ALPHA2, rel=0.25)
    last = [b.avg_var for b in curve.blocks if b.stage == 0][-1]
    for s in (1, 2, 3):
        level = stages[s]["transition_var"]
        assert level < 0.6 * last                                      # reset at the transition
        assert all(0 < d < ALPHA2 * level for d in stages[s]["increments"])
        last = [b.avg_var for b in curve.blocks if b.stage == s][-1]


def test_real_images_reset_and_as_built_blocks_are_identities(deep_tiny, images):
    on = measure(deep_tiny, images, "tiny", "images", gains=1.0)
    built = measure(deep_tiny, images, "tiny", "images", gains=None)
    for curve in (on, built):
        for prev, b in pairwise(curve.blocks):
            if b.block == 0:
                assert b.avg_var <= 0.6 * prev.avg_var                 # each transition resets
    for prev, b in pairwise(built.blocks):
        if b.block > 0:                                                # skip gain 0: identity
            assert (b.avg_var, b.avg_sq_mean) == (prev.avg_var, prev.avg_sq_mean)
    assert any(b.avg_var != p.avg_var for p, b in pairwise(on.blocks) if b.block > 0)


def test_bn_normalises_the_signal_nf_does_not(images):
    nf, _, _ = build_model("tiny", 5, seed=0)
    bn, _, _ = build_model("tiny_bn", 5, seed=0)
    ratio = {}
    for name, model in (("nf", nf), ("bn", bn)):
        small = measure(model, images, name, gains=1.0).blocks[-1].avg_var
        large = measure(model, 10 * images, name, gains=1.0).blocks[-1].avg_var
        ratio[name] = large / small
    assert ratio["nf"] > 10           # measured ~650: the signal follows the input's scale
    assert ratio["bn"] == pytest.approx(1, abs=0.05)    # batch statistics undo the input scale


@pytest.mark.integration
def test_signal_stage_writes_report(demo_shards, tmp_path):
    out = tmp_path / "signal"
    p = run_stage_in_process("signal_report", "--recipe", str(ROOT / "recipes" / "demo.yaml"),
                             "--baseline", str(ROOT / "recipes" / "demo_bn.yaml"),
                             "--shards", str(demo_shards["pretrain"]), "--out", str(out),
                             "--images", "32", "pretrain.train_res=40")
    doc = json.loads((out / "signal.json").read_text())
    assert [m["variant"] for m in doc["models"]] == ["tiny", "tiny_bn"]
    assert [m["res"] for m in doc["models"]] == [40, 48]             # override: --recipe only
    assert len(doc["curves"]) == 6 and {c["input"] for c in doc["curves"]} == {"images", "gaussian"}
    rows = (out / "signal.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 * 4 and rows[0].startswith("model,input,branches")
    assert (out / "signal.png").stat().st_size > 20_000
    assert "pretrain.train_res=40" in (out / "recipe.resolved.yaml").read_text()
    assert "stage 0: transition var" in p.stdout
    bad = run_stage_in_process("signal_report", "--recipe", str(ROOT / "recipes" / "demo.yaml"),
                               "--shards", str(demo_shards["pretrain"]), "--out", str(out),
                               "--split", "test", check=False)
    assert bad.returncode == 2 and "no split 'test'" in bad.stderr
