"""The shard stage on real image folders: tar contents, manifest, determinism, restart, skips,
verify.

Every test writes real image files into a temp dir and runs the stage script (its `main`, loaded
from stages/shard.py; as a `python stages/shard.py` subprocess where a run is killed and resumed or
the exit code is the point), then reads the tars back with webdataset.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import ROOT, stage_main
from pipeline.data.folder_source import FolderSplit
from pipeline.data.manifest import read_manifest
from pipeline.data.open_source import open_source
from pipeline.data.source import NameTable, Source
from pipeline.data.verify import verify
from pipeline.data.writer import permutation, plan_split
from pipeline.files import sha256_file
from pipeline.recipe import load_recipe

RECIPE = str(ROOT / "recipes" / "demo.yaml")
CLASSES = ("cat", "dog", "owl")                 # folder names; class index = sorted order
COLORS = ((220, 40, 40), (40, 220, 40), (40, 40, 220))


def noisy(size, color, seed, mode="RGB") -> Image.Image:
    """A class-coloured image with texture, so JPEG sizes and decoded colours are realistic."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.clip(np.array(color, np.float64) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def save_jpeg(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90, **kw)
    return path


def make_folder(root: Path, per_class=(5, 4, 4), val=2, size=(40, 48)) -> Path:
    """root/{train,val}/<class>/*.jpg, coloured by class."""
    for split, counts in (("train", per_class), ("val", (val,) * len(CLASSES))):
        for k, (cls, n) in enumerate(zip(CLASSES, counts, strict=True)):
            for i in range(n):
                save_jpeg(root / split / cls / f"{i:03d}.jpg", noisy(size, COLORS[k], k * 100 + i))
    return root


def add_odd_images(root: Path) -> None:
    """Every awkward kind of input, all in train/cat (class 0)."""
    d = root / "train" / "cat"
    save_jpeg(d / "big.jpg", noisy((96, 80), COLORS[0], 7))
    rgba = noisy((40, 40), COLORS[0], 8).convert("RGBA")
    alpha = np.full((40, 40), 255, np.uint8)
    alpha[:, :20] = 0                                   # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "alpha.png")
    save_jpeg(d / "gray.jpg", noisy((40, 40), COLORS[0], 9, "L"))
    save_jpeg(d / "cmyk.jpg", noisy((40, 40), COLORS[0], 10, "CMYK"))
    noisy((40, 40), COLORS[0], 11).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "pal.png")
    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(d / "deep.png")  # 16-bit, mid-grey
    good = io.BytesIO()
    noisy((40, 40), COLORS[0], 12).save(good, "JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    save_jpeg(d / "photo.v2.final.jpg", noisy((40, 48), COLORS[0], 13))   # dots in the name
    (d / "notes.txt").write_text("not an image")
    (d / ".DS_Store").write_bytes(b"\0\1")


# Pinned here so the tests do not move when the demo recipe's shard section is retuned.
BASE = ["shard.shard_size=5", "shard.max_size=40", "shard.jpeg_quality=95", "shard.seed=0",
        "shard.splits=[train,val]", "shard.max_skipped_fraction=0.001", "shard.max_skipped_files=0"]


def main(argv: list[str]) -> int:
    """The shard stage's exit code, in-process."""
    return stage_main("shard", argv)


def shard(src, out, *extra, workers=1) -> int:
    return main(["--recipe", RECIPE, "--source", str(src), "--out", str(out), "--workers",
                 str(workers), "--quiet", *BASE, *extra])


def read_split(out: Path, split: str) -> list[dict]:
    info = read_manifest(out)
    urls = [str(out / f) for f in info["splits"][split]["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


def test_folder_shards_hold_every_image_as_rgb_jpeg(tmp_path):
    src = make_folder(tmp_path / "raw")
    add_odd_images(src)
    out = tmp_path / "shards"
    assert shard(src, out, "shard.max_skipped_fraction=0.2", workers=2) == 0

    info = read_manifest(out)
    assert info["class_names"] == list(CLASSES) and info["num_classes"] == 3
    train = info["splits"]["train"]
    n_train = 13 + 7                                   # 13 plain + 7 odd images that decode
    assert train["num_samples"] == n_train and train["skipped"] == 1
    assert train["ignored_files"] == 2                 # notes.txt, .DS_Store
    assert sum(train["shard_lengths"]) == n_train and len(train["filenames"]) == 5
    # Equal within one sample, less the one shard that lost the truncated image.
    assert max(train["shard_lengths"]) - min(train["shard_lengths"]) <= 2
    for name, sha in zip(train["filenames"], train["sha256"], strict=True):
        assert sha256_file(out / name) == sha
    assert info["splits"]["val"]["num_samples"] == 6
    assert info["recipe"]["shard_size"] == 5 and "workers" not in info["recipe"]

    samples = read_split(out, "train")
    assert len(samples) == n_train
    by_file = {}
    for s in samples:
        assert s["__key__"].isdigit() and "." not in s["__key__"]
        meta = json.loads(s["json"])
        assert meta["cls"] == int(s["cls"]) and meta["label"] == CLASSES[meta["cls"]]
        assert meta["file"].split("/")[1] == meta["label"]        # train/<class>/<file>
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) <= 40
        by_file[meta["file"]] = (s, img)
        if not meta["file"].endswith(("gray.jpg", "deep.png", "cmyk.jpg")):
            mean = np.asarray(img, np.float64).reshape(-1, 3).mean(0)   # label matches pixels
            assert int(mean.argmax()) == meta["cls"], meta["file"]
    assert len({s["__key__"] for s in samples}) == n_train

    # Small RGB JPEGs keep their bytes; the big one is resized so its shorter side is 40.
    kept = by_file["train/dog/000.jpg"][0]["jpg"]
    assert kept == (src / "train/dog/000.jpg").read_bytes()
    assert by_file["train/cat/big.jpg"][1].size == (48, 40)
    assert by_file["train/cat/photo.v2.final.jpg"][0]["__key__"].isdigit()
    alpha = np.asarray(by_file["train/cat/alpha.png"][1], np.float64)
    assert alpha[:, :16].min() > 235                       # transparent -> white
    assert alpha[:, 24:, 0].mean() > 150 and alpha[:, 24:, 2].mean() < 100
    deep = np.asarray(by_file["train/cat/deep.png"][1], np.float64)
    assert abs(deep.mean() - 128) < 3                      # 16-bit rescaled, not clipped to 255
    gray = np.asarray(by_file["train/cat/gray.jpg"][1], np.float64)
    assert np.allclose(gray[..., 0], gray[..., 1], atol=3)

    # Shuffled across shards: source order is class by class (2 class changes), shard order not.
    order = [int(s["cls"]) for s in samples]
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) > 5
    assert [s["__key__"] for s in samples] != sorted(s["__key__"] for s in samples)
    report = json.loads((out / "_skipped.json").read_text())
    (entry,) = report["splits"]["train"]["files"]
    assert entry["file"] == "train/cat/truncated.jpg" and "truncated" in entry["reason"].lower()
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "shard_size: 5" in resolved and "shard.max_size=40" in resolved


def test_class_list_sets_the_class_order(tmp_path):
    src = make_folder(tmp_path / "raw", per_class=(2, 2, 2), val=1)
    (tmp_path / "classes.txt").write_text("# order of the published head\nowl\nbat\ncat\ndog\n")
    out = tmp_path / "shards"
    assert shard(src, out, f"shard.class_list={tmp_path / 'classes.txt'}") == 0
    assert read_manifest(out)["class_names"] == ["owl", "bat", "cat", "dog"]   # bat: no images
    for s in read_split(out, "train") + read_split(out, "val"):
        folder = json.loads(s["json"])["file"].split("/")[1]
        assert ["owl", "bat", "cat", "dog"][int(s["cls"])] == folder


def test_same_input_gives_byte_identical_tars(tmp_path):
    a = make_folder(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)                               # a different path must not matter
    assert shard(a, tmp_path / "o1", workers=1) == 0
    assert shard(b, tmp_path / "o2", workers=2) == 0
    h1, h2 = tar_hashes(tmp_path / "o1"), tar_hashes(tmp_path / "o2")
    assert h1 == h2 and len(h1) == 5
    m1, m2 = read_manifest(tmp_path / "o1"), read_manifest(tmp_path / "o2")
    assert m1["splits"] == m2["splits"]
    assert shard(a, tmp_path / "o3", "shard.seed=1") == 0  # the seed does change the shards
    assert tar_hashes(tmp_path / "o3") != h1


def test_rerun_rewrites_only_damaged_shards(tmp_path, capsys):
    src = make_folder(tmp_path / "raw", per_class=(8, 8, 8))
    out = tmp_path / "shards"
    assert shard(src, out) == 0
    before = tar_hashes(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()
    with open(out / "train-000002.tar", "r+b") as f:   # flip one byte in the middle
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (out / ".train-000003.tar.tmp").write_bytes(b"half a shard")  # as a kill leaves it
    (out / "_info.json").unlink()
    time.sleep(0.01)
    capsys.readouterr()
    assert shard(src, out) == 0
    assert "train: 24 samples in 5 shards (3 reused)" in capsys.readouterr().out
    assert tar_hashes(out) == before
    changed = {p.name for p in out.glob("*.tar") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"train-000001.tar", "train-000002.tar"}
    assert not list(out.glob(".*.tmp")) and (out / "_info.json").is_file()
    # A different recipe value changes every shard's plan: nothing is reused.
    assert shard(src, out, "shard.jpeg_quality=80", "shard.max_size=16") == 0
    assert set(tar_hashes(out).values()).isdisjoint(before.values())


@pytest.mark.integration
def test_killed_run_resumes_with_finished_shards(tmp_path):
    """SIGKILL a real `python stages/shard.py` while it blocks on one input (a FIFO), then
    re-run."""
    src = make_folder(tmp_path / "raw", per_class=(10, 10, 10))
    blocker = src / "train" / "dog" / "005.jpg"
    blocker.unlink()
    os.mkfifo(blocker)                                  # reading it blocks until we kill
    out = tmp_path / "shards"
    cmd = [sys.executable, str(ROOT / "stages" / "shard.py"), "--recipe", RECIPE, "--source",
           str(src), "--out", str(out), "--workers", "1", "--quiet", *BASE]
    recipe = load_recipe(RECIPE, BASE)
    source = open_source(str(src), recipe.shard)
    train = source.splits["train"]
    blocked = next(p.shard for p in plan_split(source, "train", recipe.shard)
                   if any(train.relname(i) == "train/dog/005.jpg" for i in p.indices))
    assert blocked >= 1, "the blocking input landed in the first shard; pick another file"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not (out / f".train-{blocked:06d}.tar.tmp").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.02)
        time.sleep(0.2)                                 # it stays blocked: nothing more happens
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / f".train-{blocked:06d}.tar.tmp").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(finished) == [f"train-{k:06d}.tar" for k in range(blocked)]
    assert not (out / "_info.json").exists()

    blocker.unlink()
    save_jpeg(blocker, noisy((40, 48), COLORS[1], 105))
    assert shard(src, out) == 0
    for name, stamp in finished.items():                # finished shards were kept as they were
        assert (out / name).stat().st_mtime_ns == stamp
    assert shard(src, tmp_path / "clean") == 0
    assert tar_hashes(out) == tar_hashes(tmp_path / "clean")
    assert verify(out) == []


def test_too_many_unreadable_images_fail_with_report(tmp_path, capsys):
    src = make_folder(tmp_path / "raw", per_class=(4, 3, 3), val=1)
    bad = src / "train" / "owl" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    (src / "train" / "dog" / "002.jpg").write_text("plain text with a .jpg name")
    out = tmp_path / "shards"
    assert shard(src, out, "shard.splits=[train]") == 1          # default threshold 0.1%
    err = capsys.readouterr().err
    assert "split 'train': " in err and "images could not be read" in err
    assert "shard.max_skipped_fraction=0.001" in err and str(out / "_skipped.json") in err
    assert not (out / "_info.json").exists()
    report = json.loads((out / "_skipped.json").read_text())["splits"]["train"]
    listed = {f["file"]: f["reason"] for f in report["files"]}
    assert "train/owl/001.jpg" in listed or "train/dog/002.jpg" in listed
    # Within the threshold both are skipped, listed with reasons, and the manifest is written.
    assert shard(src, out, "shard.splits=[train]", "shard.max_skipped_fraction=0.25") == 0
    report = json.loads((out / "_skipped.json").read_text())["splits"]["train"]
    listed = {f["file"]: f["reason"] for f in report["files"]}
    assert "truncated" in listed["train/owl/001.jpg"].lower()
    assert "cannot identify image" in listed["train/dog/002.jpg"]
    assert "BytesIO" not in listed["train/dog/002.jpg"]      # no memory address in the report
    assert read_manifest(out)["splits"]["train"]["num_samples"] == 8


def test_a_few_bad_files_in_a_small_folder_are_within_the_floor(tmp_path, capsys):
    """2 bad files of 12: 0.1% alone fails; shard.max_skipped_files (default 10) lets a small
    folder through and counts them; with a floor of 1 the message names both limits."""
    src = make_folder(tmp_path / "raw", per_class=(4, 4, 4), val=1)
    for f in (src / "train" / "owl" / "001.jpg", src / "train" / "dog" / "002.jpg"):
        f.write_bytes(f.read_bytes()[:300])
    assert shard(src, tmp_path / "floor1", "shard.splits=[train]", "shard.max_skipped_files=1") == 1
    err = capsys.readouterr().err
    assert "shard.max_skipped_fraction=0.001 and shard.max_skipped_files=1 allow" in err
    out = tmp_path / "default"
    assert shard(src, out, "shard.splits=[train]", "shard.max_skipped_files=10") == 0
    assert read_manifest(out)["splits"]["train"]["num_samples"] == 10
    from pipeline.recipe import load_recipe
    assert load_recipe(ROOT / "recipes" / "f0.yaml").shard.max_skipped_files == 10


def test_empty_image_is_skipped_as_an_empty_file(tmp_path):
    src = make_folder(tmp_path / "raw", per_class=(2, 2, 2), val=1)
    (src / "train" / "owl" / "empty.jpg").write_bytes(b"")
    outs = [tmp_path / "o1", tmp_path / "o2"]
    for out in outs:
        assert shard(src, out, "shard.splits=[train]", "shard.max_skipped_fraction=0.5") == 0
    (entry,) = json.loads((outs[0] / "_skipped.json").read_text())["splits"]["train"]["files"]
    assert entry["file"] == "train/owl/empty.jpg" and "empty file (0 bytes)" in entry["reason"]
    # The reason holds nothing run-specific, so the report is identical from run to run.
    assert (outs[0] / "_skipped.json").read_bytes() == (outs[1] / "_skipped.json").read_bytes()
    assert read_manifest(outs[0])["splits"]["train"]["num_samples"] == 6


def test_verify_names_damaged_and_missing_shards(tmp_path, capsys):
    src = make_folder(tmp_path / "raw")
    out = tmp_path / "shards"
    assert shard(src, out, "--verify") == 0
    assert verify(out) == []
    with open(out / "train-000000.tar", "r+b") as f:
        f.seek(1500)
        f.write(b"X")
    (out / "val-000000.tar").unlink()
    problems = verify(out)
    assert any(str(out / "train-000000.tar") in p and "sha256" in p for p in problems)
    assert any(str(out / "val-000000.tar") in p and "missing" in p for p in problems)
    shutil.copy(out / "train-000001.tar", out / "train-000002.tar")   # another shard's content
    problems = verify(out)
    assert any("train-000002.tar" in p and "sha256" in p for p in problems)
    capsys.readouterr()
    assert main(["--verify", "--out", str(out)]) == 1
    assert "train-000000.tar" in capsys.readouterr().err
    info = read_manifest(out)                           # a manifest that miscounts a shard
    info["splits"]["train"]["shard_lengths"][1] += 1
    info["splits"]["train"]["num_samples"] += 1
    (out / "_info.json").write_text(json.dumps(info))
    n = info["splits"]["train"]["shard_lengths"][1]
    assert f"{out / 'train-000001.tar'}: {n - 1} samples, the manifest says {n}" in verify(out)


def test_verify_says_a_truncated_shard_is_truncated(tmp_path, capsys):
    src = make_folder(tmp_path / "raw")
    out = tmp_path / "shards"
    assert shard(src, out) == 0
    tar = out / "train-000000.tar"
    size = tar.stat().st_size
    with open(tar, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert main(["--verify", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{tar}: {size // 2:,} bytes, the manifest says {size:,} (truncated)" in err
    assert f"{tar}: not a readable tar (unexpected end of data); re-run the shard stage" in err
    assert " object at 0x" not in err and "<" not in err          # no internal reprs


@pytest.mark.parametrize("case, expected", [
    ("missing", "source path not found: {src}/nope"),
    ("empty_class", "class folder {src}/train/owl has no images (1 non-image files ignored)"),
    ("not_in_list", "class folder {src}/train/owl is not in the class list"),
    ("no_split", "split folder {src}/val not found"),
    ("bad_key", "unknown key 'shard.bogus'"),
    ("bad_value", "'shard.shard_size' must be >= 1, got 0"),
])
def test_clear_errors_before_any_work(tmp_path, capsys, case, expected):
    src = make_folder(tmp_path / "raw", per_class=(2, 2, 2), val=1)
    extra, source = [], src
    if case == "missing":
        source = src / "nope"
    elif case == "empty_class":
        for p in (src / "train" / "owl").iterdir():
            p.unlink()
        (src / "train" / "owl" / "readme.md").write_text("x")
    elif case == "not_in_list":
        (tmp_path / "classes.txt").write_text("cat\ndog\n")
        extra = [f"shard.class_list={tmp_path / 'classes.txt'}"]
    elif case == "no_split":
        shutil.rmtree(src / "val")
    elif case == "bad_key":
        extra = ["shard.bogus=1"]
    elif case == "bad_value":
        extra = ["shard.shard_size=0"]
    out = tmp_path / "shards"
    assert main(["--recipe", RECIPE, "--source", str(source), "--out", str(out), *BASE,
                 *extra]) == 2
    assert expected.format(src=src) in capsys.readouterr().err
    assert not list(out.glob("*.tar")) if out.exists() else True


def test_permutation_is_pinned_and_shards_are_equal():
    # Pinned values: a change here would silently reshuffle every existing shard set.
    assert permutation(10, 0, "train").tolist() == [2, 9, 8, 7, 6, 0, 3, 5, 1, 4]
    assert permutation(10, 0, "val").tolist() != permutation(10, 0, "train").tolist()
    p = permutation(100_003, 7, "train")
    assert np.array_equal(np.sort(p), np.arange(100_003))
    for n, size in ((1, 5), (21, 5), (1000, 7), (1001, 1000)):
        labels = np.zeros(n, np.int32)
        split = FolderSplit("train", Path("."), _names(n), labels)
        section = load_recipe(RECIPE, BASE + [f"shard.shard_size={size}"]).shard
        plans = plan_split(Source("folder", ".", ["a"], {"train": split}), "train", section)
        lengths = [len(pl.indices) for pl in plans]
        assert sum(lengths) == n and max(lengths) - min(lengths) <= 1 and max(lengths) <= size
        assert len(plans) == -(-n // size)


def _names(n: int) -> NameTable:
    names = NameTable()
    for i in range(n):
        names.append(f"c/{i}.jpg")
    return names


def test_help_starts_with_the_commands(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--recipe recipes/f0.yaml --source /data/imagenet" in text
    assert "--recipe recipes/demo.yaml --source data/demo/raw/pretrain" in text


def test_training_pointed_at_the_images_says_to_shard_them_elsewhere(tmp_path):
    """--shards given the image folder: the hint shards it into a folder of its own (never into
    the image tree, which the shard stage refuses)."""
    from pipeline.data.manifest import ManifestError
    src = make_folder(tmp_path / "raw")
    with pytest.raises(ManifestError) as e:
        read_manifest(src)
    assert f"{src} holds images" in str(e.value) and f"--source {src} --out <shards folder" in str(e.value)
    assert f"--out {src}" not in str(e.value)
    with pytest.raises(ManifestError, match="run the shard stage first.*--out .*nothing"):
        read_manifest(tmp_path / "nothing")
