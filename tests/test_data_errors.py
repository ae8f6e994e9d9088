"""Damaged data during training, on real shards damaged on disk: one clear line naming the shard,
the sample and the fix (no worker traceback); shards checked against the manifest as they are
read; `loader.bad_samples: skip` replaces and counts within a budget."""
import io
import json
import shutil
import tarfile

import pytest

from conftest import ROOT, run_stage_in_process
from pipeline.data.manifest import read_manifest
from pipeline.data.reader import _replacements, shard_order
from pipeline.data.shard_reader import DataError

RECIPE = str(ROOT / "recipes" / "demo.yaml")
RUN = ["pretrain.steps=12", "pretrain.epochs=null", "pretrain.warmup_steps=2",
       "pretrain.warmup_epochs=null", "pretrain.global_batch=32", "pretrain.micro_batch=32",
       "pretrain.train_res=32", "pretrain.test_res=32", "pretrain.eval_every=0",
       "pretrain.trackers=[]", "pretrain.loader.num_workers=2"]


@pytest.fixture()
def shards(demo_shards, tmp_path):
    """A private copy of the demo's pretraining shards, to damage."""
    dst = tmp_path / "shards"
    shutil.copytree(demo_shards["pretrain"], dst)
    return dst


def members(tar_path):
    with tarfile.open(tar_path) as tf:
        return [(m.name, m.offset_data, m.size) for m in tf.getmembers()]


def first_train_tar(shards):
    """The shard the run reads first (epoch 0's shard order, seed 0)."""
    files = read_manifest(shards)["splits"]["train"]["filenames"]
    return shards / files[int(shard_order(len(files), 0, 0)[0])]


def damage_jpeg(tar_path, which=0) -> str:
    """Overwrite the middle of one JPEG member with zeros (same length: the tar stays a valid tar,
    the image no longer decodes). Returns the sample key."""
    jpegs = [m for m in members(tar_path) if m[0].endswith(".jpg")]
    name, offset, size = jpegs[which]
    data = bytearray(tar_path.read_bytes())
    data[offset + 2:offset + size] = b"\0" * (size - 2)
    tar_path.write_bytes(bytes(data))
    return name[:-len(".jpg")]


def train(shards, out, *extra, check=False):
    return run_stage_in_process("pretrain", "--recipe", RECIPE, "--shards", str(shards), "--out",
                                str(out), *RUN, *extra, threads=1, check=check)


def one_error_line(p) -> str:
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "DataLoader worker" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


@pytest.mark.integration
def test_a_damaged_image_stops_with_one_line_naming_shard_sample_and_fix(shards, tmp_path):
    tar = first_train_tar(shards)
    key = damage_jpeg(tar)
    line = one_error_line(train(shards, tmp_path / "run"))
    assert tar.name in line and "--verify" in line
    assert key in line or "does not match the manifest" in line      # whichever is met first


@pytest.mark.integration
def test_a_truncated_tar_is_named_before_it_is_read(shards, tmp_path):
    tar = first_train_tar(shards)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    line = one_error_line(train(shards, tmp_path / "run"))
    assert f"shard {tar}" in line and "the manifest says" in line and "--verify" in line


@pytest.mark.integration
def test_changed_bytes_that_still_decode_are_caught_by_the_manifest_sha256(shards, tmp_path):
    """The .json metadata member of one sample rewritten (same length): every image still
    decodes, so only the sha256 of the shard can tell."""
    tar = first_train_tar(shards)
    name, offset, size = next(m for m in members(tar) if m[0].endswith(".json"))
    data = bytearray(tar.read_bytes())
    data[offset:offset + size] = json.dumps({"x": "y" * max(0, size - 10)})[:size].encode() \
        .ljust(size)
    tar.write_bytes(bytes(data))
    line = one_error_line(train(shards, tmp_path / "run"))
    assert f"shard {tar} does not match the manifest (sha256" in line


@pytest.mark.integration
def test_skip_replaces_counts_and_finishes_within_the_budget(shards, tmp_path):
    tar = first_train_tar(shards)
    keys = [damage_jpeg(tar, i) for i in (0, 3)]
    out = tmp_path / "run"
    p = train(shards, out, "pretrain.loader.bad_samples=skip", "pretrain.loader.max_bad_samples=5",
              check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bad_samples"] == 2 and metrics["steps"] == 12
    lines = p.stdout.splitlines()
    # said per shard: one line when its first unreadable sample arrives, one with the count at the
    # end, and the total; not a line per sample
    first = [ln for ln in lines if "replaced by" in ln]
    assert len(first) == 1 and any(k in first[0] for k in keys)
    assert "replaced by" in first[0] and "loader.bad_samples=skip" in first[0]
    counts = [ln for ln in lines if f"shard {tar}: 2 sample(s) replaced, the first" in ln]
    assert len(counts) == 1 and any(k in counts[0] for k in keys)
    assert "2 unreadable sample(s) replaced in 1 shard(s)" in p.stdout
    assert sum("does not match the manifest" in ln for ln in lines) == 1
    # over the budget: the same damage with max_bad_samples=1 stops with the count
    line = one_error_line(train(shards, tmp_path / "run2", "pretrain.loader.bad_samples=skip",
                                "pretrain.loader.max_bad_samples=1"))
    assert "2 training sample(s) could not be read" in line and "max_bad_samples" in line


@pytest.mark.integration
def test_a_truncated_tar_with_skip_is_said_per_shard_not_per_sample(shards, tmp_path):
    """Half a tar lost: every sample after the cut is replaced (dozens), in three lines."""
    tar = first_train_tar(shards)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    p = train(shards, tmp_path / "run", "pretrain.loader.bad_samples=skip",
              "pretrain.loader.max_bad_samples=1000", check=True)
    replaced = json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_samples"]
    about_it = [ln for ln in p.stdout.splitlines() if tar.name in ln]
    assert replaced > 20 and len(about_it) <= 3, about_it
    assert any(f"{replaced} sample(s) replaced" in ln for ln in about_it)


def test_replacements_are_the_nearest_readable_sample_before_else_after():
    assert _replacements([None, "bad", None, "bad", "bad"]) == [0, 0, 2, 2, 2]
    assert _replacements(["bad", "bad", None]) == [2, 2, 2]
    with pytest.raises(DataError, match="no sample of a whole fetch"):
        _replacements(["bad", "bad"])


def test_the_damaged_sample_decodes_nowhere(shards):
    """The test damage is real: PIL cannot decode the damaged member."""
    from PIL import Image
    tar = first_train_tar(shards)
    key = damage_jpeg(tar)
    with tarfile.open(tar) as tf:
        data = tf.extractfile(f"{key}.jpg").read()
    with pytest.raises(OSError):
        Image.open(io.BytesIO(data)).convert("RGB")
