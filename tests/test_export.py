"""pipeline.export on real (untrained, so fast) timm models: config.json in timm's hub format,
layer names read from the built model, the weights check, and the folder written as a whole.
The same folder from a trained model, through the stage: tests/test_publish.py."""
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from conftest import LABELS, ROOT, files_in, publish_section, tiny_model_dir
from pipeline.export import (
    PublishError,
    check_weights,
    export_folder,
    hub_config,
    meta_model,
    metrics_for,
    weights_to_publish,
)
from pipeline.files import sha256_file
from pipeline.model_config import ModelConfig
from pipeline.model_dir import load_model_dir, save_model_dir
from pipeline.variants import build_model, count_params

RECIPE = ROOT / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("run") / "model")


def test_config_json_is_timms_hub_format(model_dir, tmp_path):
    published = export_folder(model_dir, tmp_path / "pub", publish_section(), None, {})
    cfg = json.loads((published / "config.json").read_text())
    assert cfg["architecture"] == "dm_nfnet_f0"
    assert cfg["model_args"]["channels"] == [32, 64, 96, 128]
    assert cfg["num_classes"] == 5 and cfg["num_features"] == 256 and cfg["global_pool"] == "avg"
    assert cfg["label_names"] == ["5", "6", "7", "8", "9"]
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["test_input_size"] == [3, 40, 40]
    assert (pc["crop_pct"], pc["crop_mode"], pc["interpolation"]) == (1.0, "squash", "bicubic")
    assert len(pc["mean"]) == len(pc["std"]) == 3
    assert (pc["classifier"], pc["first_conv"], pc["license"]) == \
        ("head.fc", "stem.conv1", "apache-2.0")
    assert cfg["nfnet_pipeline"]["variant"] == "tiny"


def test_config_json_records_the_evaluated_crop_but_never_another_test_size(model_dir):
    """The card's figures are what timm reproduces: the evaluation's crop and interpolation win;
    the test size stays the model's own (metrics at another one are refused by the stage)."""
    config = ModelConfig.load(model_dir)
    metrics = {"test_res": 48, "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bilinear"}
    pc = hub_config(config, meta_model(config), metrics=metrics).pretrained_cfg
    assert pc.input_size == (3, 32, 32) and pc.test_input_size == (3, 40, 40)
    assert (pc.crop_pct, pc.test_crop_pct) == (1.0, 0.9)
    assert (pc.crop_mode, pc.interpolation) == ("center", "bilinear")
    with pytest.raises(PublishError, match="names 4 labels for 5 classes"):
        hub_config(dataclasses.replace(config, label_names=tuple(LABELS[:4])), meta_model(config))


def test_the_folder_is_replaced_as_a_whole_and_nothing_temporary_is_left(model_dir, tmp_path):
    out = tmp_path / "pub"
    export_folder(model_dir, out, publish_section(), {"top1": 50.0}, {},
                  extra_texts={"recipes/publish.resolved.yaml": "publish: {}\n"})
    assert files_in(out) == {"model.safetensors", "config.json", "README.md", "metrics.json",
                             "SHA256SUMS", "recipes/publish.resolved.yaml"}
    assert sha256_file(out / "model.safetensors") == sha256_file(model_dir / "ema.safetensors")
    with pytest.raises(PublishError, match="already holds a different model"):
        export_folder(model_dir, out, publish_section("publish.weights=raw"), None, {})
    assert sha256_file(out / "model.safetensors") == sha256_file(model_dir / "ema.safetensors")
    export_folder(model_dir, out, publish_section("publish.weights=raw"), None, {}, force=True)
    assert sha256_file(out / "model.safetensors") == sha256_file(model_dir / "model.safetensors")
    assert "metrics.json" not in files_in(out)                # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["pub"]    # no temporary or set-aside folder
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)      # not mkdtemp's private mode
    sums = dict(reversed(line.split("  ", 1))
                for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == files_in(out) - {"SHA256SUMS"}
    assert all(sums[name] == sha256_file(out / name) for name in sums)


def test_unchecked_metrics_change_nothing_in_config_json_and_the_card_says_so(model_dir, tmp_path):
    """Metrics published with --force past the provenance check: their figures are shown, marked
    not verified; config.json keeps every test setting of the model's own."""
    metrics = {"top1": 85.0, "split": "val", "num_samples": 80, "test_res": 48, "crop_pct": 0.9,
               "crop_mode": "center", "interpolation": "bilinear"}
    why = "ema weights: expected the sha256 of model/ema.safetensors (0123), got 4567"
    out = export_folder(model_dir, tmp_path / "pub", publish_section(), metrics, {},
                        unchecked=[why])
    pc = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pc["test_input_size"] == [3, 40, 40] and pc["test_crop_pct"] == 1.0
    assert (pc["crop_mode"], pc["interpolation"]) == ("squash", "bicubic")
    text = ModelCard.load(out / "README.md").text
    assert f"**Not verified**: published with `--force`, these figures could not be checked " \
           f"against this model ({why})" in text and "| 85.00 |" in text
    assert json.loads((out / "metrics.json").read_text()) == metrics      # kept as given
    # the file the check hashes is the one published
    assert sha256_file(weights_to_publish(model_dir, "ema")) == \
        sha256_file(out / "model.safetensors") == sha256_file(model_dir / "ema.safetensors")
    assert weights_to_publish(model_dir, "raw") == model_dir / "model.safetensors"


def test_check_weights_names_the_file_the_mismatch_and_the_fix(model_dir):
    config = ModelConfig.load(model_dir)
    model, source = meta_model(config), model_dir / "ema.safetensors"
    state = load_file(str(source))
    check_weights(model, state, source, config.architecture)             # fits: no error
    wrong = {**state, "head.fc.weight": torch.zeros(6, 256)}
    with pytest.raises(PublishError) as e:
        check_weights(model, wrong, source, config.architecture)
    assert e.value.exit_code == 2
    for part in (str(source), "do not match the architecture dm_nfnet_f0 in config.json",
                 "head.fc.weight (6, 256)", "Publish the model folder the training stage wrote"):
        assert part in str(e.value), part
    state["stem.conv1.weight"][0] = float("inf")
    with pytest.raises(PublishError, match=r"non-finite values in \['stem.conv1.weight'\]"):
        check_weights(model, state, source, config.architecture)


def test_metrics_for_picks_the_published_weights_figures(tmp_path):
    metrics = {"weights": "ema", "top1": 90.0, "split": "val", "raw": {"top1": 80.0}}
    assert metrics_for(metrics, "ema", tmp_path)["top1"] == 90.0
    raw = metrics_for(metrics, "raw", tmp_path)
    assert (raw["top1"], raw["weights"], raw["split"]) == (80.0, "raw", "val")
    with pytest.raises(PublishError, match="no figures for the raw weights"):
        metrics_for({"weights": "ema", "top1": 90.0}, "raw", tmp_path / "metrics.json")


def test_f_variants_timm_does_not_name_rebuild_from_config_json(tmp_path):
    for variant in ("f7", "f4+"):
        model, arch, args = build_model(variant, 1000, device="meta")
        config = ModelConfig.for_training(
            model, architecture=arch, model_args=args, class_names=[str(i) for i in range(1000)],
            train_res=224, test_res=256, crop_pct=0.9, crop_mode="squash", interpolation="bicubic",
            lineage={"variant": variant})
        folder = tmp_path / variant
        folder.mkdir()
        hub_config(config, meta_model(config)).save(folder)
        with torch.device("meta"):
            rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=False)
        assert count_params(rebuilt) == count_params(model) != \
            count_params(timm.create_model(arch, pretrained=False, num_classes=1000, device="meta"))


def test_a_batchnorm_resnet_publishes_with_its_own_layer_names(tmp_path):
    """A non-NFNet timm model, its folder's config naming NFNet layers on purpose: the export reads
    the classifier and first conv from the built model, and timm's head swap relies on them."""
    args = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
    model = timm.create_model("resnet18", num_classes=3, **args)
    model.train()
    with torch.no_grad():                 # non-trivial batch-norm running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    config = ModelConfig.from_dict(
        {"architecture": "resnet18", "model_args": args, "num_classes": 3, "num_features": 64,
         "global_pool": "avg", "label_names": ["a", "b", "c"],
         "pretrained_cfg": {"input_size": [3, 32, 32], "test_input_size": [3, 32, 32],
                            "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear",
                            "mean": [0.5] * 3, "std": [0.5] * 3,
                            "classifier": "head.fc", "first_conv": "stem.conv1"}})
    model_dir = save_model_dir(tmp_path / "run" / "model", model, None, config)
    out = tmp_path / "pub"
    assert export_folder(model_dir, out, publish_section("publish.weights=raw"), None, {}) == out
    cfg = json.loads((out / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert (pc["classifier"], pc["first_conv"]) == ("fc", "conv1")
    assert cfg["num_features"] == 64 and cfg["global_pool"] == "avg"
    ours, _ = load_model_dir(model_dir, "raw")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    swapped = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    assert swapped.fc.out_features == 10
    card = ModelCard.load(out / "README.md")
    assert not card.data.eval_results
    assert "Not evaluated" in card.text and "NFNet image" not in card.text
