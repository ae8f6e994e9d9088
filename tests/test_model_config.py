"""pipeline/model_config.py: config.json read and written in one place, with one set of defaults.

Real files only: a config.json the project's first full version wrote (tests/data/old_config.json,
how it was made: tests/data/old_config.md), today's written by the training stages' builder, and
timm reading the same files (`timm.create_model("local-dir:...")`). The stages themselves read
them in tests/test_evaluate.py, test_finetune.py and test_publish.py."""
import dataclasses
import json

import pytest
import timm
import torch

from conftest import ROOT, tiny_config, tiny_model_dir
from pipeline.evaluate import eval_settings
from pipeline.export import hub_config, meta_model
from pipeline.lineage import model_test_res
from pipeline.model_config import (
    TIMM_CROP_MODE,
    ModelConfig,
    ModelConfigError,
    Preprocessing,
)
from pipeline.model_dir import build_from_config
from pipeline.std_conv import TIMM_REBUILD_EPS
from pipeline.transfer import load_init
from pipeline.variants import build_model

OLD = ROOT / "tests" / "data" / "old_config.json"


def test_the_written_file_round_trips_and_keeps_todays_shape(tmp_path):
    config = tiny_config(recipe="demo")
    path = config.save(tmp_path)
    assert path == tmp_path / "config.json" and path.read_text() == config.to_json()
    assert ModelConfig.load(tmp_path) == ModelConfig.load(path) == config
    data = json.loads(path.read_text())
    assert list(data) == ["architecture", "model_args", "num_classes", "num_features",
                          "global_pool", "label_names", "pretrained_cfg", "nfnet_pipeline"]
    assert data["model_args"]["std_conv_eps"] == TIMM_REBUILD_EPS       # timm's closest WS
    assert data["pretrained_cfg"] == {
        "input_size": [3, 32, 32], "test_input_size": [3, 40, 40],
        "crop_pct": 40 / 72, "test_crop_pct": 40 / 72, "crop_mode": "squash",     # S / (S + 32)
        "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "classifier": "head.fc", "first_conv": "stem.conv1"}
    assert ModelConfig.from_dict(data).to_dict() == data


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    """timm's Hub configs and later versions carry keys this module does not know."""
    data = {**tiny_config().to_dict(), "label_descriptions": {"5": "five"}}
    data["pretrained_cfg"] = {**data["pretrained_cfg"], "tag": "demo", "license": "apache-2.0"}
    config = ModelConfig.from_dict(data)
    assert config.extra == {"label_descriptions": {"5": "five"}}
    assert config.pretrained_cfg.extra == {"tag": "demo", "license": "apache-2.0"}
    config.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == data


def test_a_config_the_first_version_wrote_still_loads_and_builds_the_same_network():
    """The old file (tests/data/old_config.md) holds every preprocessing key; its model_args lack
    std_conv_eps and its lineage the mixed precision, both added later."""
    raw = json.loads(OLD.read_text())
    assert "std_conv_eps" not in raw["model_args"] and "mixed_precision" not in raw["nfnet_pipeline"]
    old = ModelConfig.load(OLD)
    assert old.to_dict() == raw                                 # nothing added, nothing lost
    assert (old.architecture, old.num_classes, old.class_names) == \
        ("dm_nfnet_f0", 5, ["0", "1", "2", "3", "4"])
    pc = raw["pretrained_cfg"]
    assert old.pretrained_cfg.test_size == tuple(pc["test_input_size"])
    assert (old.pretrained_cfg.test_crop, old.pretrained_cfg.crop_mode) == \
        (pc["test_crop_pct"], "squash")
    assert (old.variant, old.init, old.from_scratch) == ("tiny", "", False)
    # the network it describes is today's tiny NFNet, weight standardisation included
    with torch.device("meta"):
        ours, _, _ = build_model("tiny", 5)
        rebuilt = build_from_config(old)
    assert rebuilt.stem.conv1.eps == ours.stem.conv1.eps == TIMM_REBUILD_EPS
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("key", ["architecture", "num_classes"])
def test_a_missing_required_key_names_the_file_and_the_key(tmp_path, key):
    data = tiny_config().to_dict()
    del data[key]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelConfigError, match=rf"{tmp_path}/config.json has no '{key}'"):
        ModelConfig.load(tmp_path)


def test_a_wrong_value_names_the_file_and_the_key_and_no_file_names_the_folder(tmp_path):
    data = tiny_config().to_dict()
    data["pretrained_cfg"]["test_input_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelConfigError, match=rf"{tmp_path}/config.json: "
                                               r"pretrained_cfg.test_input_size must be \[channels, "
                                               r"height, width\] \(3 integers\), got 40"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not a JSON config.json"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ModelConfigError, match=rf"no config.json in {tmp_path}/nothing: expected "
                                               r"a model folder"):
        ModelConfig.load(tmp_path / "nothing")


def test_a_config_without_preprocessing_means_what_it_means_to_timm(tmp_path):
    """The required keys only: our defaults are those of timm's local-dir loader."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    config = ModelConfig.load(tmp_path)
    with torch.device("meta"):
        theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=False)
    timm_test = timm.data.resolve_data_config({}, model=theirs, use_test_size=True)
    ours = eval_settings(config)
    assert (ours.res, ours.crop_pct, ours.crop_mode, ours.interpolation) == \
        (timm_test["input_size"][-1], timm_test["crop_pct"], timm_test["crop_mode"],
         timm_test["interpolation"]) == (224, 0.875, TIMM_CROP_MODE, "bicubic")
    assert (ours.mean, ours.std) == (timm_test["mean"], timm_test["std"])
    assert config.pretrained_cfg.train_res is None                      # not recorded: no guess
    assert config.to_dict() == {"architecture": "resnet18", "model_args": {}, "num_classes": 3,
                                "global_pool": "avg", "label_names": [],
                                "pretrained_cfg": Preprocessing().to_dict()}


def test_every_stage_reads_the_same_defaults(tmp_path):
    """A model folder whose config.json has no crop mode or test settings: evaluate, fine-tuning
    (the crop mode the fine-tuned model is tested with), publish and the lineage's resolution
    check read the same values (before, evaluate read "center" and fine-tuning "squash")."""
    folder = tiny_model_dir(tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    for key in ("crop_mode", "test_input_size", "test_crop_pct", "interpolation"):
        del data["pretrained_cfg"][key]
    (folder / "config.json").write_text(json.dumps(data))
    config = ModelConfig.load(folder)
    evaluated = eval_settings(config)
    init = load_init(str(folder), "raw").config
    published = hub_config(config, meta_model(config)).pretrained_cfg
    assert evaluated.crop_mode == config.pretrained_cfg.crop_mode == init.pretrained_cfg.crop_mode == \
        published.crop_mode == TIMM_CROP_MODE
    assert evaluated.res == model_test_res(config)[0] == published.test_input_size[-1] == 32
    assert evaluated.crop_pct == published.test_crop_pct == config.pretrained_cfg.crop_pct == 1.0
    assert evaluated.interpolation == published.interpolation == "bicubic"


def test_from_scratch_inits_and_published_folders_state_what_they_know(tmp_path):
    scratch = load_init("none:tiny").config
    assert scratch.from_scratch and scratch.pretrained_cfg.train_res is None
    assert scratch.pretrained_cfg.crop_mode == "squash"                          # the tiny NFNet's way
    folder = tiny_model_dir(tmp_path / "model")
    config = ModelConfig.load(folder)
    published = hub_config(config, meta_model(config), license="apache-2.0")
    out = tmp_path / "pub"
    out.mkdir()
    published.save(out)
    again = ModelConfig.load(out)
    assert again == published and again.pretrained_cfg.extra == {"num_classes": 5,
                                                                 "license": "apache-2.0"}
    assert dataclasses.replace(again, pretrained_cfg=config.pretrained_cfg) == config
