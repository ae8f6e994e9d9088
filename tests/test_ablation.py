"""The AGC sweep end to end at tiny size: a 2 x 2 corner (clip 0.01 / off x batch 16 / 64) of
ablations/dvc.yaml run by `dvc repro` on a fresh copy of the project, through
ablations/agc_sweep.py and the real pretrain stage, with the table, the DVC plot data and the PNG
checked.

At lr_base 6.4 (lr 0.4 at batch 16, 1.6 at 64; one epoch at 32 px) the unclipped tiny NFNet
diverges (NaN loss, skipped steps) at both batches and clip 0.01 trains (48% and 41% top-1,
chance 20%): both branches of the divergence logic are exercised by real runs."""
import csv
import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
       "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
       "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}
CORNER = ("pretrain.lr_base=6.4 pretrain.epochs=1 pretrain.warmup_epochs=0.25 "
          "pretrain.train_res=32 pretrain.test_res=32 pretrain.micro_batch=16 "
          "pretrain.nan_policy=skip pretrain.eval_every=0 pretrain.checkpoint_every=0 "
          "'pretrain.trackers=[]' pretrain.loader.num_workers=0")


def sh(*cmd, cwd, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def corner(demo_shards, tmp_path_factory):
    """A copy of the project (tracked + unignored files, committed), its ablation parameters cut
    to the corner and pointed at the test shards; then `dvc repro` of the sweep's report."""
    dst = tmp_path_factory.mktemp("ablation") / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith("reports/"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    params = dst / "ablations" / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["shards"] = str(demo_shards["pretrain"])
    p["agc"].update(clip_factors="0.01 null", global_batches="16 64", overrides=CORNER,
                    plot_columns=["clip_0.01", "clip_off"])
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    sh("git", "init", "-q", cwd=dst)
    sh("git", "add", "-A", cwd=dst)
    sh("git", "commit", "-qm", "clone", cwd=dst)
    return dst, sh("dvc", "repro", "ablations/dvc.yaml:agc", cwd=dst)


def test_corner_runs_every_cell_through_dvc(corner):
    dst, log = corner
    assert "Running stage 'ablations/dvc.yaml:agc'" in log
    assert "ablations/dvc.yaml:data" not in log and "compare" not in log   # only what it needs
    for batch, clip in ((16, "0.01"), (64, "0.01"), (16, "null"), (64, "null")):
        run = dst / "ablations" / "runs" / "agc" / f"b{batch}-clip{clip}"
        assert f"--out {run.relative_to(dst)} pretrain.clip_factor={clip}" in log
        resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
        assert resolved["pretrain"]["global_batch"] == batch
        assert resolved["pretrain"]["clip_factor"] == (None if clip == "null" else float(clip))
        assert resolved["resolved"]["lr"] == pytest.approx(6.4 * batch / 256)   # lr scales
    lock = yaml.safe_load((dst / "ablations" / "dvc.lock").read_text())
    assert "agc" in lock["stages"]
    assert "Running stage" not in sh("dvc", "repro", "ablations/dvc.yaml:agc", cwd=dst)  # no-op
    again = sh("dvc", "repro", "-f", "ablations/dvc.yaml:agc", cwd=dst)   # forced: cells kept
    assert again.count("done with these settings, kept") == 4 and "stages/pretrain.py" not in again


def test_table_flags_divergence_and_plots_are_written(corner):
    dst, _ = corner
    out = dst / "reports" / "agc"
    rows = list(csv.DictReader((out / "agc_sweep.csv").open()))
    cells = {(r["clip"], int(r["global_batch"])): r for r in rows}
    assert sorted(cells) == [("0.01", 16), ("0.01", 64), ("off", 16), ("off", 64)]
    for b in (16, 64):
        assert cells[("off", b)]["status"] == "diverged"
        assert cells[("off", b)]["val_nll"] == "nan" and int(cells[("off", b)]["skipped_steps"]) > 0
        assert cells[("0.01", b)]["status"] == "ok" and float(cells[("0.01", b)]["val_top1"]) > 30
    assert int(cells[("0.01", 16)]["steps"]) == 45 and int(cells[("0.01", 64)]["steps"]) == 11
    assert json.loads((out / "agc_sweep.json").read_text())[0]["clip"] == "0.01"
    wide = list(csv.DictReader((out / "agc_sweep_dvc.csv").open()))
    assert [w["global_batch"] for w in wide] == ["16", "64"]
    assert set(wide[0]) == {"global_batch", "clip_0.01", "clip_off"}
    assert float(wide[1]["clip_0.01"]) == pytest.approx(float(cells[("0.01", 64)]["val_top1"]))
    assert (out / "agc_sweep.png").stat().st_size > 30_000
    shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=dst, env=ENV,
                           capture_output=True, text=True, timeout=120)
    plots = json.loads(shown.stdout)                   # the demo chain's absent plots: warnings
    sweep = plots["data"]["AGC sweep (val top-1 per clip factor)"][0]["content"]["data"]["values"]
    assert {v["field"] for v in sweep} == {"clip_0.01", "clip_off"} and len(sweep) == 4


def test_a_bare_dvc_repro_at_the_root_runs_the_root_pipeline_only(corner):
    """`dvc repro` without targets reproduces ./dvc.yaml only: with a one-stage stand-in for the
    demo chain (the real one takes minutes), none of the never-run ablation stages starts."""
    dst, _ = corner
    root = dst / "dvc.yaml"
    chain = root.read_text()
    try:
        root.write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n    outs: [hello.txt]\n")
        log = sh("dvc", "repro", cwd=dst)
        assert "Running stage 'hello'" in log and "ablations" not in log
        assert "compare" in sh("dvc", "status", "ablations/dvc.yaml", cwd=dst)   # still to run
    finally:
        root.write_text(chain)


def test_the_ablation_pipeline_keeps_the_demo_chain_order_deterministic(corner):
    """DVC plans `dvc repro` of the chain through a networkx subgraph view, which iterates the
    chain's stages in set (string-hash) order once the repo holds more than twice as many stages;
    so this pipeline keeps at most as many stages as the chain has (the sweep's cells run inside
    one stage)."""
    dst, _ = corner
    ours = [l for l in sh("dvc", "stage", "list", "ablations/dvc.yaml", cwd=dst).splitlines() if l]
    chain = [l for l in sh("dvc", "stage", "list", cwd=dst).splitlines() if l]
    assert 0 < len(ours) <= len(chain), (ours, chain)
