"""The ablations (pipeline/ablation/, ablations/).

- Units: the pretrain command is built from the stage script the caller names (the library does
  not locate stages/), and top-1 with BN batch statistics goes through `pipeline.evaluate.predict`
  on a tiny conv net and the test digits: garbage running statistics make eval mode predict one
  class while batch statistics do not; without BN it is exactly `predict`'s top-1 (dropout off).
- The AGC sweep end to end at tiny size: a 2 x 2 corner (clip 0.01 / off x batch 16 / 64) of
  ablations/dvc.yaml run by `dvc repro` on a fresh copy of the project, through
  ablations/agc_sweep.py and the real pretrain stage, with the table, the DVC plot data and the
  PNG checked. At lr_base 6.4 (lr 0.4 at batch 16, 1.6 at 64; one epoch at 32 px) the unclipped
  tiny NFNet diverges (NaN loss, skipped steps) at both batches and clip 0.01 trains (48% and 41%
  top-1, chance 20%): both branches of the divergence logic are exercised by real runs.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT, copy_project, run
from pipeline.ablation.nf_vs_bn import BatchStatsBN, batch_stats_top1
from pipeline.ablation.runs import pretrain_command
from pipeline.data.manifest import load_split
from pipeline.evaluate import compute_metrics, eval_settings, predict
from pipeline.model_config import ModelConfig, Preprocessing

CORNER = ("pretrain.lr_base=6.4 pretrain.epochs=1 pretrain.warmup_epochs=0.25 "
          "pretrain.train_res=32 pretrain.test_res=32 pretrain.micro_batch=16 "
          "pretrain.nan_policy=skip pretrain.eval_every=0 pretrain.checkpoint_every=0 "
          "'pretrain.trackers=[]' pretrain.loader.num_workers=0")


def output(p: subprocess.CompletedProcess) -> str:
    """stdout and stderr together: DVC logs to one, the stage scripts to either."""
    return p.stdout + p.stderr


def test_pretrain_command_runs_the_script_it_is_given(tmp_path):
    script = tmp_path / "elsewhere" / "pretrain.py"
    cmd = pretrain_command("python", script, "r.yaml", "shards", tmp_path / "out", ["a.b=1"])
    assert cmd == [sys.executable, str(script), "--resume", "matching", "--recipe", "r.yaml",
                   "--shards", "shards", "--out", str(tmp_path / "out"), "a.b=1"]
    launch = pretrain_command("accelerate launch --num_processes 8", script, "r", "s", tmp_path, [])
    assert launch[:5] == ["accelerate", "launch", "--num_processes", "8", str(script)]


CONFIG = ModelConfig(architecture="tiny_net", num_classes=5,     # the test's own net, below
                     pretrained_cfg=Preprocessing(test_input_size=(3, 32, 32), crop_pct=1.0,
                                                  interpolation="bilinear"))


def tiny_net(bn: bool) -> nn.Module:
    """Five channels, one per class (identity head, no bias): the class is the channel with the
    largest pooled activation, so BN with batch statistics spreads the predictions over the
    classes. Dropout 0.5 before the head: a forward not in eval mode would show."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 5, padding=2), nn.BatchNorm2d(5) if bn else nn.Identity(),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                        nn.Linear(5, 5))
    with torch.no_grad():
        net[6].weight.copy_(torch.eye(5))
        net[6].bias.zero_()
    return net


def eval_mode_predictions(model: nn.Module, split):
    settings = eval_settings(CONFIG)
    return predict(model, split, settings.transform(), batch=16, workers=0,
                   device=torch.device("cpu"), mean=settings.mean, std=settings.std)


def test_bn_batch_statistics_top1_goes_through_predict(demo_shards):
    val = load_split(demo_shards["pretrain"], "val")
    model = tiny_net(bn=True)
    bn = model[1]
    bn.running_mean.fill_(1e3)             # garbage: eval mode sends every activation below 0
    bn.running_var.fill_(1e-4)
    kept = bn.running_mean.clone()
    running = eval_mode_predictions(model, val)
    assert len(set(running.top5[:, 0])) == 1                          # ReLU(0): one class for all
    wrapped = BatchStatsBN(model).eval()                              # what `predict` calls
    assert wrapped.model[1].training and not wrapped.model[5].training   # BN on, dropout off
    batch_stats = eval_mode_predictions(wrapped, val)
    assert len(set(batch_stats.top5[:, 0])) >= 4                      # measured: 5
    top1 = batch_stats_top1(model, val, CONFIG, batch=16)
    assert top1 == pytest.approx(compute_metrics(batch_stats, [str(c) for c in range(5)])["top1"])
    assert top1 != compute_metrics(running, [str(c) for c in range(5)])["top1"]   # 30 vs 19
    assert torch.equal(bn.running_mean, kept) and not model.training   # the original untouched


def test_batch_statistics_top1_without_bn_is_predicts(demo_shards):
    val = load_split(demo_shards["pretrain"], "val")
    model = tiny_net(bn=False)
    plain = eval_mode_predictions(model, val)
    wrapped = eval_mode_predictions(BatchStatsBN(model), val)
    assert (wrapped.top5 == plain.top5).all() and (wrapped.nll == plain.nll).all()  # dropout off
    expected = compute_metrics(plain, [str(c) for c in range(5)])["top1"]
    assert batch_stats_top1(model, val, CONFIG, batch=16) == expected


# Runs a script as `python <script> <args>` would and, at exit, prints the project files it
# imported: a stage's DVC deps must cover the modules it loads, lazy imports included.
PROBE = """import atexit, runpy, sys
def report():
    files = {getattr(m, "__file__", None) for n, m in list(sys.modules.items())
             if n.split(".")[0] == "pipeline"}
    print("IMPORTED", *sorted(f for f in files if f))
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def imported_files(script: str, *args: str) -> list[str]:
    """The `pipeline` files (relative to the project) a real run of `script` imports."""
    p = run([sys.executable, "-c", PROBE, ROOT / script, *args], cwd=ROOT)
    line = next(x for x in p.stdout.splitlines() if x.startswith("IMPORTED"))
    return [str(Path(f).resolve().relative_to(ROOT)) for f in line.split()[1:]]


def stage_deps(name: str) -> list[str]:
    stage = yaml.safe_load((ROOT / "ablations" / "dvc.yaml").read_text())["stages"][name]
    return [d for d in stage.get("do", stage)["deps"] if "${" not in d]


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["data", "signal"])
def test_report_stages_depend_on_every_module_they_import(stage, demo_raw, demo_shards,
                                                          tmp_path):
    """The stages that do not run the pretrain stage list modules, not all of `pipeline`."""
    if stage == "data":
        files = imported_files("pipeline/data/demo.py", str(tmp_path / "raw"), "--size", "16")
        files += imported_files("stages/shard.py", "--recipe", "recipes/demo.yaml", "--source",
                                str(demo_raw / "pretrain"), "--out", str(tmp_path / "shards"),
                                "--workers", "1", "--quiet", "shard.max_size=16")
    else:
        files = imported_files("stages/signal_report.py", "--recipe", "recipes/demo.yaml",
                               "--baseline", "recipes/demo_bn.yaml", "--shards",
                               str(demo_shards["pretrain"]), "--out", str(tmp_path / "signal"),
                               "--images", "4")
    deps = stage_deps(stage)
    assert "pipeline" not in deps and any(f.startswith("pipeline/") for f in files)
    missing = [f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"ablations/dvc.yaml:{stage} runs {missing} but does not list them"


@pytest.fixture(scope="module")
def corner(demo_shards, tmp_path_factory):
    """A fresh copy of the project (less the committed reports), its ablation parameters cut to
    the corner and pointed at the test shards (committed too); then `dvc repro` of the sweep."""
    dst = copy_project(tmp_path_factory.mktemp("ablation") / "project", skip=("reports/",))
    params = dst / "ablations" / "params.yaml"
    p = yaml.safe_load(params.read_text())
    p["shards"] = str(demo_shards["pretrain"])
    p["agc"].update(clip_factors="0.01 null", global_batches="16 64", overrides=CORNER,
                    plot_columns=["clip_0.01", "clip_off"])
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    run(["git", "commit", "-qam", "the corner"], cwd=dst)
    return dst, output(run(["dvc", "repro", "ablations/dvc.yaml:agc"], cwd=dst))


@pytest.mark.integration
def test_corner_runs_every_cell_through_dvc(corner):
    dst, log = corner
    assert "Running stage 'ablations/dvc.yaml:agc'" in log
    assert "ablations/dvc.yaml:data" not in log and "compare" not in log   # only what it needs
    for batch, clip in ((16, "0.01"), (64, "0.01"), (16, "null"), (64, "null")):
        cell = dst / "ablations" / "runs" / "agc" / f"b{batch}-clip{clip}"
        assert f"--out {cell.relative_to(dst)} pretrain.clip_factor={clip}" in log
        resolved = yaml.safe_load((cell / "recipe.resolved.yaml").read_text())
        assert resolved["pretrain"]["global_batch"] == batch
        assert resolved["pretrain"]["clip_factor"] == (None if clip == "null" else float(clip))
        assert resolved["resolved"]["lr"] == pytest.approx(6.4 * batch / 256)   # lr scales
    lock = yaml.safe_load((dst / "ablations" / "dvc.lock").read_text())
    assert "agc" in lock["stages"]
    assert "Running stage" not in output(run(["dvc", "repro", "ablations/dvc.yaml:agc"],
                                             cwd=dst))                          # a no-op
    again = output(run(["dvc", "repro", "-f", "ablations/dvc.yaml:agc"], cwd=dst))  # cells kept
    assert again.count("done with these settings, kept") == 4 and "stages/pretrain.py" not in again


@pytest.mark.integration
def test_table_flags_divergence_and_plots_are_written(corner):
    dst, _ = corner
    out = dst / "reports" / "agc"
    rows = list(csv.DictReader((out / "agc_sweep.csv").open()))
    cells = {(r["clip"], int(r["global_batch"])): r for r in rows}
    assert sorted(cells) == [("0.01", 16), ("0.01", 64), ("off", 16), ("off", 64)]
    for b in (16, 64):
        assert cells[("off", b)]["status"] == "diverged"
        nll = float(cells[("off", b)]["val_nll"])     # NaN, or astronomically large: not learnt
        assert not nll < 100 and int(cells[("off", b)]["skipped_steps"]) > 0
        assert cells[("0.01", b)]["status"] == "ok" and float(cells[("0.01", b)]["val_top1"]) > 30
    assert int(cells[("0.01", 16)]["steps"]) == 45 and int(cells[("0.01", 64)]["steps"]) == 11
    assert json.loads((out / "agc_sweep.json").read_text())[0]["clip"] == "0.01"
    wide = list(csv.DictReader((out / "agc_sweep_dvc.csv").open()))
    assert [w["global_batch"] for w in wide] == ["16", "64"]
    assert set(wide[0]) == {"global_batch", "clip_0.01", "clip_off"}
    assert float(wide[1]["clip_0.01"]) == pytest.approx(float(cells[("0.01", 64)]["val_top1"]))
    assert (out / "agc_sweep.png").stat().st_size > 30_000
    shown = run(["dvc", "plots", "show", "--json"], cwd=dst, timeout=120, check=False)
    plots = json.loads(shown.stdout)                   # the demo chain's absent plots: warnings
    sweep = plots["data"]["AGC sweep (val top-1 per clip factor)"][0]["content"]["data"]["values"]
    assert {v["field"] for v in sweep} == {"clip_0.01", "clip_off"} and len(sweep) == 4


@pytest.mark.integration
def test_a_bare_dvc_repro_at_the_root_runs_the_root_pipeline_only(corner):
    """`dvc repro` without targets reproduces ./dvc.yaml only: with a one-stage stand-in for the
    demo chain (the real one takes minutes), none of the never-run ablation stages starts."""
    dst, _ = corner
    root = dst / "dvc.yaml"
    chain = root.read_text()
    try:
        root.write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n"
                        "    outs: [hello.txt]\n")
        log = output(run(["dvc", "repro"], cwd=dst))
        assert "Running stage 'hello'" in log and "ablations" not in log
        status = output(run(["dvc", "status", "ablations/dvc.yaml"], cwd=dst))
        assert "compare" in status                                             # still to run
    finally:
        root.write_text(chain)


@pytest.mark.integration
def test_the_ablation_pipeline_keeps_the_demo_chain_order_deterministic(corner):
    """DVC plans `dvc repro` of the chain through a networkx subgraph view, which iterates the
    chain's stages in set (string-hash) order once the repo holds more than twice as many stages;
    so this pipeline keeps at most as many stages as the chain has (the sweep's cells run inside
    one stage)."""
    dst, _ = corner
    ours = run(["dvc", "stage", "list", "ablations/dvc.yaml"], cwd=dst).stdout.splitlines()
    chain = run(["dvc", "stage", "list"], cwd=dst).stdout.splitlines()
    ours, chain = [s for s in ours if s], [s for s in chain if s]
    assert 0 < len(ours) <= len(chain), (ours, chain)


def fake_run(folder: Path, clip, batch: int, metrics: dict | None) -> Path:
    """A pretrain run folder as the ablation reads it: resolved recipe, model config, metrics."""
    (folder / "model").mkdir(parents=True)
    (folder / "recipe.resolved.yaml").write_text(yaml.safe_dump(
        {"pretrain": {"clip_factor": clip, "global_batch": batch},
         "resolved": {"lr": 0.1 * batch / 256, "total_steps": 40}}))
    ModelConfig(architecture="dm_nfnet_f0", num_classes=5).save(folder / "model")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_the_sweep_table_has_a_row_per_cell_and_flags_each_outcome(tmp_path):
    from pipeline.ablation.agc_sweep import cell_dir, collect_agc, write_agc
    from pipeline.ablation.table import csv_text
    good = {"train_loss": 0.5, "val_top1_ema": 91.23456789, "val_nll_ema": 0.3, "steps": 40}
    runs = [fake_run(cell_dir(tmp_path, None, 64), None, 64, good),
            fake_run(cell_dir(tmp_path, 0.16, 64), 0.16, 64, {**good, "train_loss": float("nan")}),
            fake_run(cell_dir(tmp_path, 0.01, 256), 0.01, 256, {**good, "val_top1_ema": 21.0}),
            fake_run(cell_dir(tmp_path, 0.01, 64), 0.01, 64, None)]
    rows = collect_agc(runs)
    assert [(r["clip"], r["global_batch"], r["status"]) for r in rows] == [
        ("0.01", 64, "missing"), ("0.01", 256, "at chance"), ("0.16", 64, "diverged"),
        ("off", 64, "ok")]                                   # by clip factor (off last), batch
    files = write_agc(rows, tmp_path / "report", "sweep")
    table = files["csv"].read_text().splitlines()
    assert table[0].startswith("clip,clip_factor,global_batch,lr,") and len(table) == 5
    assert ",91.2346," in table[4] and table[1].split(",")[5] == ""    # 6 digits; None empty
    assert json.loads(files["json"].read_text())[3]["num_classes"] == 5    # every key in JSON
    assert files["dvc"].read_text().splitlines()[0] == "global_batch,clip_0.01,clip_0.16,clip_off"
    assert files["png"].stat().st_size > 0
    assert csv_text([{"a": 1.0 / 3, "b": None, "c": "x"}], ["a", "b"]) == "a,b\n0.333333,\n"
