"""The evaluate stage: exact metrics on a set and a model whose answers are known by hand, the same
numbers as a timm `validate.py`-style loop, and one prediction per sample on 1 or 2 processes."""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import webdataset as wds
from PIL import Image

from conftest import ROOT, run_stage_in_process, torchrun
from pipeline.data.loader import EvalShards, make_loader
from pipeline.data.manifest import load_split, manifest_path, write_manifest
from pipeline.evaluate import eval_settings
from pipeline.files import sha256_file
from pipeline.model_config import ModelConfig
from pipeline.model_dir import save_model_dir
from pipeline.variants import build_model

RECIPE = str(ROOT / "recipes" / "demo.yaml")


def write_shards(root: Path, labels: list[int], class_names: list[str], per_shard: int) -> None:
    """A `val` split of noise JPEGs with the given labels, `per_shard` samples a tar."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    names, lengths = [], []
    for s, start in enumerate(range(0, len(labels), per_shard)):
        names.append(f"val-{s:06d}.tar")
        chunk = labels[start:start + per_shard]
        lengths.append(len(chunk))
        with wds.TarWriter(str(root / names[-1]), encoder=False) as tw:
            for i, label in enumerate(chunk, start):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
                tw.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": str(label).encode()})
    write_manifest(root, {"num_classes": len(class_names), "class_names": class_names,
                          "keys": {"image": "jpg", "label": "cls"},
                          "splits": {"val": {"name": "val", "num_samples": len(labels),
                                             "filenames": names, "shard_lengths": lengths}}})


def tiny_model(num_classes: int, seed: int = 0):
    model, arch, args = build_model("tiny", num_classes=num_classes, seed=seed)
    return model.eval(), arch, args


def constant_model(bias: list[float]):
    """A real tiny NFNet whose classifier weight is zero: its logits are `bias` for any image."""
    model, arch, args = tiny_model(len(bias))
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(torch.tensor(bias))
    return model, arch, args


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_known_model_on_known_set_gives_the_hand_computed_metrics(tmp_path):
    classes = [f"c{i}" for i in range(7)]
    labels = [0, 1, 1, 2, 3, 1, 4, 0, 1, 2, 1, 3, 6]          # 13 samples; no c5
    write_shards(tmp_path / "shards", labels, classes, per_shard=5)
    raw_bias = [0.5, 2.0, 1.0, -1.0, 0.0, 1.5, -0.5]            # predicts c1; top-5 {1, 5, 2, 0, 4}
    ema_bias = [0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]              # predicts c2
    raw, arch, args = constant_model(raw_bias)
    ema, _, _ = constant_model(ema_bias)
    config = ModelConfig.for_training(raw, architecture=arch, model_args=args, class_names=classes,
                                      train_res=32, test_res=32, crop_pct=1.0, crop_mode="squash",
                                      interpolation="bilinear", lineage={})
    save_model_dir(tmp_path / "model", raw, ema, config)
    p = run_stage_in_process("evaluate", "--recipe", RECIPE, "--model", str(tmp_path / "model"),
                             "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "eval"),
                             "evaluate.batch=4", "evaluate.num_workers=2", threads=1)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())

    # by hand: 5 of the 13 labels are c1, 2 are c2; top-5 of raw misses c3 (x2) and c6 (x1)
    assert m["num_samples"] == 13 and m["weights"] == "ema"
    assert m["raw"]["top1"] == 5 / 13 * 100
    assert m["top1"] == 2 / 13 * 100
    assert m["raw"]["top5"] == 10 / 13 * 100
    z = math.log(sum(math.exp(b) for b in raw_bias))
    assert m["raw"]["nll"] == pytest.approx(sum(z - raw_bias[y] for y in labels) / 13, rel=1e-6)
    confidence = math.exp(max(raw_bias) - z)                    # the same for every sample
    assert m["raw"]["ece"] == pytest.approx(abs(5 / 13 - confidence), rel=1e-5)

    # plots: per-class top-1, confusion (EMA predicts c2 for everything), calibration
    per_class = {r["class"]: r["top1"] for r in read_csv(tmp_path / "eval" / "plots" / "per_class.csv")}
    assert per_class == {"c0": "0.0000", "c1": "0.0000", "c2": "100.0000", "c3": "0.0000",
                         "c4": "0.0000", "c5": "", "c6": "0.0000"}
    confusion = {(r["actual"], r["predicted"]): int(r["count"])
                 for r in read_csv(tmp_path / "eval" / "plots" / "confusion.csv")}
    assert confusion == {("c0", "c2"): 2, ("c1", "c2"): 5, ("c2", "c2"): 2, ("c3", "c2"): 2,
                         ("c4", "c2"): 1, ("c6", "c2"): 1}
    details = json.loads((tmp_path / "eval" / "plots" / "details.json").read_text())
    assert np.array(details["raw"]["confusion"])[:, 1].tolist() == [2, 5, 2, 2, 1, 0, 1]
    calib = [r for r in read_csv(tmp_path / "eval" / "plots" / "calibration.csv")]
    assert len(calib) == 1 and int(calib[0]["count"]) == 13
    assert (tmp_path / "eval" / "plots" / "evaluation.png").stat().st_size > 1000
    # the printed table
    assert "raw" in p.stdout and f"{5 / 13 * 100:7.2f}" in p.stdout and "img/s" in p.stdout

    # what was scored: each weights file's sha256, the classes, test settings and data
    scored = m["scored"][0]
    assert scored["weights"] == {
        "ema": {"file": str(tmp_path / "model" / "ema.safetensors"),
                "sha256": sha256_file(tmp_path / "model" / "ema.safetensors")},
        "raw": {"file": str(tmp_path / "model" / "model.safetensors"),
                "sha256": sha256_file(tmp_path / "model" / "model.safetensors")}}
    assert scored["weights"]["ema"]["sha256"] != scored["weights"]["raw"]["sha256"]
    assert scored["class_names"] == classes and scored["split"] == "val"
    assert (scored["test_res"], scored["crop_pct"], scored["crop_mode"], scored["interpolation"]) \
        == (32, 1.0, "squash", "bilinear")         # the tiny variant squashes
    assert scored["shards"] == str(tmp_path / "shards")
    assert scored["manifest_sha256"] == sha256_file(manifest_path(tmp_path / "shards"))
    # DVC's metrics table skips the record (a list) and keeps every figure
    from dvc.repo.metrics.show import _extract_metrics
    shown = _extract_metrics(m, "metrics.json")
    assert "scored" not in shown and shown["top1"] == m["top1"] and shown["raw"] == m["raw"]


# ------------------------------------------------------------------------------------------------
# A real classifier (a linear probe on a tiny NFNet's features) with test settings that differ
# from every default: 40 px test (32 px train), crop 0.8, bilinear.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_model(demo_shards, tmp_path_factory):
    from sklearn.linear_model import LogisticRegression
    model, arch, args = tiny_model(5, seed=1)
    classes = [str(d) for d in range(5, 10)]
    config = ModelConfig.for_training(model, architecture=arch, model_args=args,
                                      class_names=classes, train_res=32, test_res=40, crop_pct=0.8,
                                      crop_mode="squash", interpolation="bilinear",
                                      lineage={"variant": "tiny"})
    settings = eval_settings(config)
    ds = EvalShards(load_split(demo_shards["finetune"], "train"), settings.transform(),
                    rank=0, world=1, workers=0, batch=256)
    feats, ys = [], []
    with torch.no_grad():
        for b in make_loader(ds, 0):
            x = (b.images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(settings.mean).view(1, 3, 1, 1)) \
                / torch.tensor(settings.std).view(1, 3, 1, 1)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
            ys.append(b.labels)
    clf = LogisticRegression(max_iter=3000).fit(torch.cat(feats).numpy(), torch.cat(ys).numpy())
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.from_numpy(clf.coef_))
        model.head.fc.bias.copy_(torch.from_numpy(clf.intercept_))
    folder = tmp_path_factory.mktemp("probe") / "model"
    save_model_dir(folder, model, None, config)
    return folder


def timm_validate(folder: Path, shards: Path, args: dict | None = None) -> np.ndarray:
    """timm's validate.py in miniature: model and eval transform from the folder's config, a
    plain loop over the shard tars read by webdataset. Returns the confusion matrix."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config(args or {}, model=model, use_test_size=True)
    transform = timm.data.create_transform(**data_config)
    split = load_split(shards, "val")
    ds = wds.WebDataset(list(split.urls), shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
    confusion = np.zeros((5, 5), dtype=np.int64)
    top5 = 0
    images, labels = [], []

    def flush():
        nonlocal top5
        with torch.no_grad():
            logits = model(torch.stack(images))
        y = torch.tensor(labels)
        for a, b in zip(y.tolist(), logits.argmax(1).tolist()):
            confusion[a, b] += 1
        top5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum().item()
        images.clear()
        labels.clear()

    for img, cls in ds:
        images.append(transform(img.convert("RGB")))
        labels.append(int(cls))
        if len(images) == 50:
            flush()
    flush()
    return confusion, top5


@pytest.mark.integration
def test_metrics_equal_a_timm_validate_loop(probe_model, demo_shards, tmp_path):
    shards = demo_shards["finetune"]
    common = ["--recipe", RECIPE, "--model", str(probe_model), "--shards", str(shards)]
    run_stage_in_process("evaluate", *common, "--out", str(tmp_path / "eval"), threads=1)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["weights"] == "raw" and "ema" not in m         # the folder has no EMA weights
    assert (m["test_res"], m["crop_pct"], m["interpolation"]) == (40, 0.8, "bilinear")
    details = json.loads((tmp_path / "eval" / "plots" / "details.json").read_text())
    ours = np.array(details["raw"]["confusion"])

    theirs, top5 = timm_validate(probe_model, shards)
    n = int(theirs.sum())
    assert n == m["num_samples"] == 179
    assert (ours == theirs).all(), f"ours\n{ours}\ntimm\n{theirs}"
    assert m["top1"] == np.trace(theirs) / n * 100
    assert m["top5"] == top5 / n * 100
    assert 40 < m["top1"] < 100                                  # a real, imperfect classifier

    # the recipe may override the checkpoint's settings; timm given the same ones agrees again,
    # and disagrees with the first run (so the comparison above is sensitive to the transform)
    run_stage_in_process("evaluate", *common, "--out", str(tmp_path / "eval32"),
                         "evaluate.test_res=32", "evaluate.crop_pct=1.0", threads=1)
    m32 = json.loads((tmp_path / "eval32" / "metrics.json").read_text())
    assert (m32["test_res"], m32["crop_pct"]) == (32, 1.0)
    details32 = json.loads((tmp_path / "eval32" / "plots" / "details.json").read_text())
    ours32 = np.array(details32["raw"]["confusion"])
    theirs32, _ = timm_validate(probe_model, shards, {"input_size": (3, 32, 32), "crop_pct": 1.0})
    assert (ours32 == theirs32).all()
    assert not (ours32 == ours).all()


@pytest.mark.integration
def test_two_processes_predict_each_sample_once_with_the_same_metrics(probe_model, demo_shards,
                                                                       tmp_path):
    # 179 samples in shards of 64: 2 processes x 2 workers read uneven contiguous ranges
    common = ["--recipe", RECIPE, "--model", str(probe_model), "--shards", str(demo_shards["finetune"]),
              "evaluate.batch=16", "evaluate.num_workers=2"]
    run_stage_in_process("evaluate", *common, "--out", str(tmp_path / "one"), threads=1)
    p = torchrun(2, "stages/evaluate.py", *common, "--out", str(tmp_path / "two"), timeout=300)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["num_samples"] == two["num_samples"] == 179
    for k in ("top1", "top5"):
        assert one[k] == two[k]
    for k in ("nll", "ece"):                    # per-sample logits: batch composition differs
        assert one[k] == pytest.approx(two[k], rel=1e-5, abs=1e-7)
    details = [json.loads((tmp_path / r / "plots" / "details.json").read_text())["raw"]
               for r in ("one", "two")]
    assert details[0]["confusion"] == details[1]["confusion"]
    assert details[0]["per_class_top1"] == details[1]["per_class_top1"]
    assert p.stdout.count("top1") == 1          # one table, printed by the main process


def test_predict_refuses_a_partial_set(probe_model, demo_shards):
    """The count check itself: rank 0 of 2 alone (its partner's predictions never arrive)
    covers half the split, which is an error, not a metric over half the data."""
    from pipeline.evaluate import load_models, predict

    models, config, _ = load_models(probe_model, ["ema", "raw"])
    assert list(models) == ["raw"]
    split = load_split(demo_shards["finetune"], "val")
    transform = eval_settings(config).transform()
    cpu = torch.device("cpu")
    preds = predict(models["raw"], split, transform, batch=64, workers=0, device=cpu)
    assert preds.index.tolist() == list(range(179))
    with pytest.raises(RuntimeError, match="89 predictions for 179 samples"):
        predict(models["raw"], split, transform, batch=64, workers=0, device=cpu, rank=0, world=2)


@pytest.mark.integration
def test_the_default_split_finds_a_validation_split_and_records_its_name(probe_model, demo_shards,
                                                                          tmp_path):
    """Shards of an HF dataset's "validation" split: `--split val` (the default) evaluates them,
    and metrics.json names the split as the manifest does."""
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards["finetune"], shards)
    info = json.loads(manifest_path(shards).read_text())
    info["splits"]["validation"] = info["splits"].pop("val")
    manifest_path(shards).write_text(json.dumps(info))
    run_stage_in_process("evaluate", "--recipe", RECIPE, "--model", str(probe_model), "--shards",
                         str(shards), "--out", str(tmp_path / "eval"), threads=1)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["split"] == "validation" and m["num_samples"] == 179
    assert m["scored"][0]["split"] == "validation"
