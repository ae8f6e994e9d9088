"""Shard-stage sources (pipeline/data/open_source.py and the kinds it dispatches to): ImageNet's flat
val, Hugging Face datasets (save_to_disk and parquet; the Hub path offline), re-sharding existing
tars, and the refusal of an --out inside the source."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import ROOT, run_stage, stage_main
from pipeline.data.manifest import read_manifest
from pipeline.data.open_source import open_source
from pipeline.data.source import SourceError
from pipeline.recipe import load_recipe

RECIPE = str(ROOT / "recipes" / "demo.yaml")
WNIDS = ("n01440764", "n01443537", "n01484850")         # sorted: class index 0, 1, 2
COLORS = ((220, 40, 40), (40, 220, 40), (40, 40, 220))


def jpeg_bytes(color, seed, size=(40, 32), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(color, float) + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def color_class(jpg: bytes) -> int:
    return int(np.asarray(Image.open(io.BytesIO(jpg)), float).reshape(-1, 3).mean(0).argmax())


def samples(out: Path, split: str) -> list[dict]:
    info = read_manifest(out)
    return list(wds.WebDataset([str(out / f) for f in info["splits"][split]["filenames"]],
                               shardshuffle=False))


def main(argv: list[str]) -> int:
    """The shard stage's exit code, in-process."""
    return stage_main("shard", argv)


def run(source, out, *extra) -> int:
    return main(["--recipe", RECIPE, "--source", str(source), "--out", str(out), "--workers", "1",
                 "--quiet", "shard.shard_size=4", "shard.max_size=64", "shard.seed=0",
                 "shard.splits=[train,val]", *extra])


def imagenet(root: Path, val_labels: list[int]) -> Path:
    """train/<wnid>/<wnid>_<i>.JPEG and a flat val/ILSVRC2012_val_<n>.JPEG (no label folders)."""
    for k, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            jpg = jpeg_bytes(COLORS[k], 10 * k + i)
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpg)
    (root / "val").mkdir()
    for n, k in enumerate(val_labels, 1):
        (root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg_bytes(COLORS[k], 100 + n))
    return root


def check_val_labels(out: Path, val_labels: list[int]) -> None:
    val = samples(out, "val")
    assert len(val) == len(val_labels)
    for s in val:
        meta = json.loads(s["json"])
        n = int(meta["file"].split("_")[-1].split(".")[0])
        assert int(s["cls"]) == val_labels[n - 1] == color_class(s["jpg"])
        assert meta["label"] == WNIDS[val_labels[n - 1]]


def test_imagenet_flat_val_with_loc_solution_csv(tmp_path):
    labels = [2, 0, 1, 1, 2]
    src = imagenet(tmp_path / "CLS-LOC", labels)
    rows = [f"ILSVRC2012_val_{n:08d},{WNIDS[k]} 1 2 30 30 {WNIDS[k]} 5 5 9 9"
            for n, k in enumerate(labels, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    out = tmp_path / "shards"
    assert run(src, out, f"shard.label_file={tmp_path / 'LOC_val_solution.csv'}") == 0
    info = read_manifest(out)
    assert info["class_names"] == list(WNIDS)
    assert info["splits"]["train"]["num_samples"] == 9
    check_val_labels(out, labels)


def test_imagenet_flat_val_with_devkit_ground_truth(tmp_path):
    from scipy.io import savemat

    labels = [1, 2, 0, 0]
    src = imagenet(tmp_path / "imagenet", labels)
    # The devkit's ILSVRC2012_IDs are not the sorted-wnid order: 1 -> n01484850, 2 -> n01440764,
    # 3 -> n01443537; a parent synset (num_children > 0) must be ignored.
    ids = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(ids[w], w, w, 0) for w in WNIDS] + [(1001, "n00000001", "fish", 3)], dtype)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(str(ids[WNIDS[k]]) for k in labels) + "\n")
    out = tmp_path / "shards"
    gt = devkit / "ILSVRC2012_validation_ground_truth.txt"
    assert run(src, out, f"shard.label_file={gt}") == 0
    assert read_manifest(out)["class_names"] == list(WNIDS)
    check_val_labels(out, labels)


@pytest.mark.parametrize("case, expected", [
    ("no_label_file", "holds images directly, without class folders; set shard.label_file"),
    ("unknown_wnid", "label 'n09999999' of {src}/val/ILSVRC2012_val_00000002.JPEG"),
    ("unlabelled", "{src}/val/ILSVRC2012_val_00000003.JPEG has no label in"),
])
def test_imagenet_label_errors_name_the_image(tmp_path, capsys, case, expected):
    src = imagenet(tmp_path / "in", [0, 1, 2])
    rows = {1: WNIDS[0], 2: "n09999999" if case == "unknown_wnid" else WNIDS[1], 3: WNIDS[2]}
    if case == "unlabelled":
        del rows[3]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},{w} 0 0 1 1\n" for n, w in rows.items()))
    extra = [] if case == "no_label_file" else [f"shard.label_file={csv}"]
    assert run(src, tmp_path / "out", *extra) == 2
    assert expected.format(src=src) in capsys.readouterr().err


def hf_dataset(n_train=9, n_val=3, corrupt_row=None):
    """Image + ClassLabel features; class names deliberately unsorted to check their order is
    kept."""
    import datasets

    names = ["zebra", "ant", "moth"]

    def part(n, seed):
        rows = [{"bytes": jpeg_bytes(COLORS[i % 3], seed + i, fmt="PNG" if i % 2 else "JPEG"),
                 "path": None} for i in range(n)]
        if corrupt_row is not None and seed == 0:
            rows[corrupt_row]["bytes"] = rows[corrupt_row]["bytes"][:100]
        feats = datasets.Features({"img": datasets.Image(), "lbl": datasets.ClassLabel(names=names),
                                   "extra": datasets.Value("string")})
        return datasets.Dataset.from_dict({"img": rows, "lbl": [i % 3 for i in range(n)],
                                           "extra": ["x"] * n}, features=feats)

    return datasets.DatasetDict(train=part(n_train, 0), validation=part(n_val, 50)), names


def check_hf_shards(out: Path, names: list[str], n_train: int, n_val: int) -> None:
    info = read_manifest(out)
    assert info["class_names"] == names
    assert info["splits"]["train"]["num_samples"] == n_train
    assert info["splits"]["val"]["num_samples"] == n_val
    for s in samples(out, "train") + samples(out, "val"):
        assert int(s["cls"]) == color_class(s["jpg"])
        assert json.loads(s["json"])["label"] == names[int(s["cls"])]


def test_hf_save_to_disk_folder(tmp_path):
    dd, names = hf_dataset(corrupt_row=4)
    dd.save_to_disk(tmp_path / "ds")
    out = tmp_path / "shards"
    assert run(tmp_path / "ds", out, "shard.image_column=img", "shard.label_column=lbl",
               "shard.max_skipped_fraction=0.5") == 0
    check_hf_shards(out, names, 8, 3)
    skipped = json.loads((out / "_skipped.json").read_text())["splits"]["train"]["files"]
    assert [s["file"] for s in skipped] == ["train/4"]
    # A class list re-indexes ClassLabel labels by name (here: a published head's order).
    (tmp_path / "classes.txt").write_text("moth\nbee\nzebra\nant\n")
    out2 = tmp_path / "shards2"
    assert run(tmp_path / "ds", out2, "shard.image_column=img", "shard.label_column=lbl",
               "shard.max_skipped_fraction=0.5",
               f"shard.class_list={tmp_path / 'classes.txt'}") == 0
    assert read_manifest(out2)["class_names"] == ["moth", "bee", "zebra", "ant"]
    for s in samples(out2, "train"):
        label = json.loads(s["json"])["label"]
        by_index = ["moth", "bee", "zebra", "ant"][int(s["cls"])]
        assert label == names[color_class(s["jpg"])] == by_index


def test_hf_parquet_files(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    dd, names = hf_dataset()
    (tmp_path / "pq").mkdir()
    dd["train"].to_parquet(tmp_path / "pq" / "train-00000-of-00001.parquet")
    dd["validation"].to_parquet(tmp_path / "pq" / "validation-00000-of-00001.parquet")
    out = tmp_path / "shards"
    assert run(tmp_path / "pq", out, "shard.image_column=img", "shard.label_column=lbl") == 0
    check_hf_shards(out, names, 9, 3)
    # One split from a glob of files that carry no split name.
    shutil.copy(tmp_path / "pq" / "train-00000-of-00001.parquet", tmp_path / "pq" / "part0.parquet")
    out2 = tmp_path / "shards2"
    assert run(f"{tmp_path}/pq/part*.parquet", out2, "shard.image_column=img",
               "shard.label_column=lbl", "shard.splits=[train]") == 0
    assert read_manifest(out2)["splits"]["train"]["num_samples"] == 9


def test_hf_column_and_split_errors(tmp_path, capsys):
    dd, _ = hf_dataset(n_train=3, n_val=1)
    dd.save_to_disk(tmp_path / "ds")
    assert run(tmp_path / "ds", tmp_path / "o", "shard.image_column=picture") == 2
    assert "has no column 'picture' (shard.image_column); its columns: img, lbl, extra" in \
        capsys.readouterr().err
    assert run(tmp_path / "ds", tmp_path / "o", "shard.image_column=img",
               "shard.label_column=lbl", "shard.splits=[test]") == 2
    assert "split 'test' is not in" in capsys.readouterr().err


@pytest.mark.integration
def test_hf_hub_name_offline_fails_clearly(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = run_stage("shard", "--recipe", RECIPE, "--source", "hf:someorg/no-such-dataset",
                    "--out", str(tmp_path / "o"), env=env, timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    assert "could not load Hugging Face dataset 'someorg/no-such-dataset'" in res.stderr


def make_tars(tmp_path: Path) -> Path:
    src = tmp_path / "raw"
    for k, cls in enumerate(("a", "b", "c")):
        (src / "train" / cls).mkdir(parents=True)
        for i in range(4):
            jpg = jpeg_bytes(COLORS[k], 10 * k + i, (64, 48))
            (src / "train" / cls / f"{i}.jpg").write_bytes(jpg)
    tars = tmp_path / "tars"
    assert run(src, tars, "shard.splits=[train]", "shard.max_size=null") == 0
    return tars


def test_reshard_tars_changes_shard_and_image_size(tmp_path):
    tars = make_tars(tmp_path)
    out = tmp_path / "resharded"
    assert run(tars, out, "shard.splits=[train]", "shard.shard_size=5", "shard.max_size=24") == 0
    info = read_manifest(out)
    assert info["class_names"] == ["a", "b", "c"]
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4]
    got = samples(out, "train")
    files = sorted(json.loads(s["json"])["file"] for s in got)
    assert files == sorted(f"train/{c}/{i}.jpg" for c in "abc" for i in range(4))  # names kept
    for s in got:
        assert Image.open(io.BytesIO(s["jpg"])).size == (32, 24)
        assert int(s["cls"]) == color_class(s["jpg"])
    # Tars without a manifest: class names fall back to the indices; the split to all tars.
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in tars.glob("*.tar"):
        shutil.copy(p, bare / p.name.replace("train", "part"))
    assert run(bare, tmp_path / "o2", "shard.splits=[train]") == 0
    assert read_manifest(tmp_path / "o2")["class_names"] == ["0", "1", "2"]


def image_folder(root: Path) -> Path:
    for k, cls in enumerate(("a", "b")):
        (root / "train" / cls).mkdir(parents=True)
        (root / "train" / cls / "0.jpg").write_bytes(jpeg_bytes(COLORS[k], k))
    return root


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["folder", "tars"])
@pytest.mark.parametrize("where", ["equal", "inside"])
def test_out_in_the_source_tree_is_refused(tmp_path, kind, where):
    src = image_folder(tmp_path / "raw") if kind == "folder" else make_tars(tmp_path)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    out = src if where == "equal" else src / "train" / "shards"
    res = run_stage("shard", "--recipe", RECIPE, "--source", str(src), "--out", str(out),
                    "--workers", "1", "--quiet", "shard.splits=[train]", check=False)
    assert res.returncode == 2, res.stderr
    assert f"--out {out} is {'inside ' if where == 'inside' else ''}the source folder {src}" \
        in res.stderr
    assert "Write the shards outside the source tree" in res.stderr
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before   # nothing written


def test_out_next_to_the_source_files_is_refused(tmp_path):
    tars = make_tars(tmp_path)
    recipe = load_recipe(RECIPE, ["shard.splits=[train]"])
    with pytest.raises(SourceError, match="is the source folder"):     # a re-shard in place
        open_source(f"{tars}/*.tar", recipe.shard, out=tars)
    with pytest.raises(SourceError, match="is inside the source folder"):   # read back next time
        open_source(f"{tmp_path}/**/*.tar", recipe.shard, out=tmp_path / "new")
    # Beside the files (not a recursive glob) is fine: the glob does not reach the output.
    assert open_source(f"{tars}/*.tar", recipe.shard, out=tars / "new").kind == "tars"


def test_the_tar_and_hugging_face_kinds_read_every_sample_with_its_label(tmp_path):
    """open_tars and open_hf directly: each split's samples, bytes and labels, the class names."""
    from pipeline.data.hf_source import open_hf
    from pipeline.data.tar_source import open_tars
    tars = make_tars(tmp_path)
    section = load_recipe(RECIPE, ["shard.splits=[train]"]).shard
    source = open_tars(str(tars), sorted(str(p) for p in tars.glob("*.tar")), section)
    split = source.splits["train"]
    assert (source.kind, source.class_names, len(split)) == ("tars", ["a", "b", "c"], 12)
    for i in range(len(split)):
        data, name = split.read(i)
        assert color_class(data) == split.labels[i]
        assert name.startswith(f"train/{source.class_names[split.labels[i]]}/")   # name kept
    dd, names = hf_dataset(n_train=4, n_val=2)
    dd.save_to_disk(tmp_path / "ds")
    section = load_recipe(RECIPE, ["shard.splits=[train,val]", "shard.image_column=img",
                                   "shard.label_column=lbl"]).shard
    source = open_hf(str(tmp_path / "ds"), section)
    assert source.kind == "hf" and source.class_names == names
    assert {k: len(s) for k, s in source.splits.items()} == {"train": 4, "val": 2}
    for split in source.splits.values():
        for i in range(len(split)):
            assert color_class(split.read(i)[0]) == split.labels[i]
