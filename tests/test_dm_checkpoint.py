"""DeepMind's released checkpoints (haiku names, HWIO / IO layouts) into our layout, written here
from a known model in that exact naming and layout, through the finetune stage's `--init dm:`."""
import io
import pickle

import numpy as np
import pytest
import torch

from conftest import ROOT, run_stage
from pipeline.dm_checkpoint import DeepMindCheckpointError, infer_variant, read_params, to_timm_state
from pipeline.variants import build_model

HAIKU_CONV = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2",
              "downsample.conv": "conv_shortcut"}


def haiku_tree(model, depths):
    """{haiku module path: {param: array}} as nfnets/nfnet.py names them, written out by hand:
    stem_conv0..3, nf_block, nf_block_1, ..., conv0/conv1/conv1b/conv2/conv_shortcut,
    squeeze_excite/~/linear(_1), skip_gain, final_conv, linear; conv w HWIO, linear w IO."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tree = {}

    def put(module, param, value):
        tree.setdefault(f"NFNet/~/{module}", {})[param] = value

    def conv(module, prefix):
        put(module, "w", sd[f"{prefix}.weight"].transpose(2, 3, 1, 0))     # OIHW -> HWIO
        put(module, "gain", sd[f"{prefix}.gain"].reshape(-1))
        put(module, "bias", sd[f"{prefix}.bias"])

    for i in range(4):
        conv(f"stem_conv{i}", f"stem.conv{i + 1}")
    k = 0
    for s, d in enumerate(depths):
        for i in range(d):
            block, prefix = ("nf_block" if k == 0 else f"nf_block_{k}"), f"stages.{s}.{i}"
            put(block, "skip_gain", sd[f"{prefix}.skipinit_gain"])
            for ours, theirs in HAIKU_CONV.items():
                if f"{prefix}.{ours}.weight" in sd:
                    conv(f"{block}/~/{theirs}", f"{prefix}.{ours}")
            for fc, lin in (("fc1", "linear"), ("fc2", "linear_1")):
                w = sd[f"{prefix}.attn_last.{fc}.weight"][:, :, 0, 0]
                put(f"{block}/~/squeeze_excite/~/{lin}", "w", w.T)           # OI -> IO
                put(f"{block}/~/squeeze_excite/~/{lin}", "b", sd[f"{prefix}.attn_last.{fc}.bias"])
            k += 1
    conv("final_conv", "final_conv")
    put("linear", "w", sd["head.fc.weight"].T)
    put("linear", "b", sd["head.fc.bias"])
    return tree


@pytest.fixture(scope="module")
def f0():
    """A real F0 (71.5 M parameters) with random weights and nonzero skip gains."""
    model, _, _ = build_model("f0", 1000, seed=3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.3)
    return model.eval()


def test_a_flat_npz_in_haiku_naming_gives_the_same_logits(f0, tmp_path):
    tree = haiku_tree(f0, (1, 2, 6, 3))
    flat = {f"{module}/{param}": v for module, ps in tree.items() for param, v in ps.items()}
    assert len(flat) == 233 and "NFNet/~/nf_block_11/~/squeeze_excite/~/linear_1/b" in flat
    np.savez(tmp_path / "F0_haiku.npz", **flat)
    params = read_params(tmp_path / "F0_haiku.npz")
    assert infer_variant(params) == "f0"
    state = to_timm_state(params, (1, 2, 6, 3))
    loaded, _, _ = build_model("f0", 1000, seed=99)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    loaded.load_state_dict(state)                           # strict: every name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), f0(x))


def test_the_nested_pickle_deepmind_ships_loads_and_code_in_it_does_not(f0, tmp_path):
    tree = haiku_tree(f0, (1, 2, 6, 3))
    (tmp_path / "F0_haiku.npz").write_bytes(pickle.dumps(tree))    # what dill writes for this
    state = to_timm_state(read_params(tmp_path / "F0_haiku.npz"), (1, 2, 6, 3))
    assert torch.equal(state["head.fc.weight"], f0.head.fc.weight)

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"NFNet/~/linear": {"w": Evil()}}))
    with pytest.raises(DeepMindCheckpointError, match="refusing to load posix.system"):
        read_params(tmp_path / "evil.npz")
    buf = io.BytesIO()
    np.savez(buf, **{"NFNet/~/nf_block_99/~/conv0/w": np.zeros((1, 1, 1, 1), np.float32)})
    (tmp_path / "odd.npz").write_bytes(buf.getvalue())
    with pytest.raises(DeepMindCheckpointError, match="no NFNet variant has 1 blocks"):
        infer_variant(read_params(tmp_path / "odd.npz"))


@pytest.mark.integration
def test_finetune_starts_from_a_deepmind_checkpoint(demo_shards, tmp_path):
    """The stage reads `--init dm:<file>`: the tiny net written in haiku naming and layout (its
    depth and width identify it, as they identify F0-F7), then a new 5-class head."""
    model, _, _ = build_model("tiny", 7, seed=5)
    tree = haiku_tree(model, (1, 1, 1, 1))
    flat = {f"{m}/{p}": v for m, ps in tree.items() for p, v in ps.items()}
    np.savez(tmp_path / "tiny_haiku.npz", **flat)
    out = tmp_path / "run"
    p = run_stage("finetune", "--recipe", str(ROOT / "recipes" / "demo.yaml"),
                  "--init", f"dm:{tmp_path / 'tiny_haiku.npz'}",
                  "--shards", str(demo_shards["finetune"]), "--out", str(out),
                  "finetune.steps=2", "finetune.epochs=null", "finetune.warmup_steps=1",
                  "finetune.warmup_epochs=null", "finetune.train_res=32", "finetune.test_res=32",
                  "finetune.trackers=[]", "finetune.eval_every=0")
    assert "new head" in p.stdout and "DeepMind checkpoint" in p.stdout
    from safetensors.torch import load_file
    after = load_file(str(out / "model" / "model.safetensors"))
    assert after["head.fc.weight"].shape == (5, 256)
