"""The publish stage on a real tiny trained model (shard -> pretrain -> finetune -> evaluate, at
32-40 px): the folder timm loads, its recipes, sums and card (with the data the shard manifests
record), the lineage notes, the refusals and their exit codes (metrics of another model, at
another resolution or from before the provenance check among them), the Hub unreachable for
real, and the Hub flags and errors through the stage (HfApi's network methods replaced by
tests/fakehub.py's recording fake). The library parts on their own: tests/test_export.py,
test_model_card.py, test_lineage.py, test_hub.py."""
import json
import shutil
import subprocess

import pytest
import timm
import torch
import yaml
from fakehub import SECRET, FakeHub, http_error
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from conftest import ROOT, files_in, fill, run_stage, run_stage_in_process, stage_main, tiny_model_dir
from pipeline.data.manifest import read_manifest
from pipeline.files import sha256_file
from pipeline.model_config import ModelConfig
from pipeline.model_dir import load_model_dir

pytestmark = pytest.mark.integration   # a trained, evaluated model published by the stage

RECIPE = str(ROOT / "recipes" / "demo.yaml")
FILES = {"model.safetensors", "config.json", "README.md", "metrics.json", "SHA256SUMS",
         "recipes/pretrain.resolved.yaml", "recipes/finetune.resolved.yaml",
         "recipes/publish.resolved.yaml"}


def publish(trained, out, *args, metrics=True, model=None) -> int:
    """The stage in-process (as `python stages/publish.py ...`); returns its exit code."""
    argv = ["--recipe", RECIPE, "--model", str(model or trained["model"]), "--out", str(out),
            *(["--metrics", str(metrics if metrics is not True else trained["metrics"])]
              if metrics else []), *args]
    return stage_main("publish", argv)


@pytest.fixture(scope="module")
def trained(demo_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run_stage_in_process("pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]),
                         "--out", str(runs / "pretrain"), "pretrain.epochs=1",
                         "pretrain.warmup_epochs=0.5", "pretrain.train_res=32", "pretrain.test_res=32",
                         "pretrain.log_every=50")
    run_stage_in_process("finetune", "--recipe", RECIPE, "--init", str(runs / "pretrain" / "model"),
                         "--shards", str(demo_shards["finetune"]), "--out", str(runs / "finetune"),
                         "finetune.epochs=1", "finetune.warmup_epochs=0.5", "finetune.train_res=32",
                         "finetune.test_res=40", "finetune.log_every=50")
    run_stage_in_process("evaluate", "--recipe", RECIPE, "--model", str(runs / "finetune" / "model"),
                         "--shards", str(demo_shards["finetune"]), "--out", str(runs / "evaluate"))
    return {"runs": runs, "model": runs / "finetune" / "model",
            "metrics": runs / "evaluate" / "metrics.json"}


@pytest.fixture(scope="module")
def published(trained):
    """The real script, as the DVC stage runs it."""
    out = trained["runs"] / "publish"
    p = run_stage("publish", "--recipe", RECIPE, "--model", str(trained["model"]),
                  "--metrics", str(trained["metrics"]), "--out", str(out))
    assert "local-dir:" in p.stdout and "note:" not in p.stdout
    return out


def test_folder_holds_weights_config_card_recipes_and_sums_and_no_pickle(trained, published):
    assert files_in(published) == FILES
    # EMA weights by default, byte for byte the training run's
    assert sha256_file(published / "model.safetensors") == \
        sha256_file(trained["model"] / "ema.safetensors")
    for stage in ("pretrain", "finetune"):
        assert (published / "recipes" / f"{stage}.resolved.yaml").read_bytes() == \
            (trained["runs"] / stage / "recipe.resolved.yaml").read_bytes()
    for f in published.rglob("*"):          # no pickle (0x80 protocol byte) nor torch zip (PK)
        assert f.is_dir() or \
            f.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK")
    sums = dict(reversed(line.split("  ", 1))
                for line in (published / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == FILES - {"SHA256SUMS"}
    assert all(sums[name] == sha256_file(published / name) for name in sums)
    assert oct((published).stat().st_mode & 0o777) != oct(0o700)      # not mkdtemp's private mode


def test_timm_loads_the_folder_with_the_evaluate_stage_logits_and_test_preprocessing(trained,
                                                                                      published):
    ours, _ = load_model_dir(trained["model"], "ema")
    theirs = timm.create_model(f"local-dir:{published}", pretrained=True).eval()
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    test = timm.data.resolve_data_config({}, model=theirs, use_test_size=True)
    assert tuple(test["input_size"]) == (3, 40, 40) and test["crop_pct"] == 1.0
    assert test["crop_mode"] == "squash" and test["interpolation"] == "bicubic"
    assert tuple(timm.data.resolve_data_config({}, model=theirs)["input_size"]) == (3, 32, 32)
    # timm's own transfer paths use the named layers: a new head, a one-channel stem
    moved = timm.create_model(f"local-dir:{published}", pretrained=True, num_classes=7, in_chans=1)
    assert moved(torch.zeros(1, 1, 40, 40)).shape == (1, 7)


def test_the_card_describes_the_runs_the_stage_found_and_their_evaluation(trained, published,
                                                                          demo_shards):
    metrics = json.loads(trained["metrics"].read_text())
    card = ModelCard.load(published / "README.md")        # huggingface_hub's own parser
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    results = {r.metric_name: r for r in card.data.eval_results}
    top1 = results["Top-1 accuracy (%)"]
    assert top1.metric_value == round(metrics["top1"], 3) and top1.dataset_split == "val"
    assert results["Top-5 accuracy (%)"].metric_value == round(metrics["top5"], 3)
    pre = yaml.safe_load((trained["runs"] / "pretrain" / "recipe.resolved.yaml").read_text())
    fin = yaml.safe_load((trained["runs"] / "finetune" / "recipe.resolved.yaml").read_text())
    for fact in ("variant `tiny`", f"{pre['resolved']['num_samples']} training images",
                 f"{fin['resolved']['num_samples']} training images",
                 f"= {fin['resolved']['total_steps']} steps", "train 32 px, test 40 px",
                 "finetune.test_res=40", f"{metrics['num_samples']} held-out images"):
        assert fact in card.text, fact
    cfg = json.loads((published / "config.json").read_text())
    assert cfg["pretrained_cfg"]["test_input_size"] == [3, 40, 40] and cfg["num_classes"] == 5
    # the data actually sharded, from the manifests the runs recorded, in the order of the runs
    info = {stage: read_manifest(demo_shards[stage]) for stage in ("pretrain", "finetune")}
    source = {stage: f"`{i['source']['location']}` ({i['source']['kind']})" for stage, i in info.items()}
    assert f"pre-trained on {source['pretrain']}, then fine-tuned on {source['finetune']} with " \
           f"nfnet-pipeline" in card.text
    for stage, what in (("pretrain", "pre-training"), ("finetune", "fine-tuning")):
        assert f"{what} on {source[stage]}: {info[stage]['splits']['train']['num_samples']} " \
               f"training images, 5 classes" in card.text
        assert f"sharded to `{demo_shards[stage]}`" in card.text
    assert f"(split `val` of {source['finetune']})" in card.text
    assert "sklearn-digits" not in card.text            # the recipe's name: Hub metadata only


def test_refuses_to_publish_without_metrics_unless_told(trained, tmp_path, capsys):
    assert publish(trained, tmp_path / "a", metrics=False) == 2
    assert "no evaluation metrics" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert publish(trained, tmp_path / "b", "--no-metrics-ok", metrics=False) == 0
    assert not ModelCard.load(tmp_path / "b" / "README.md").data.eval_results
    assert "metrics.json" not in files_in(tmp_path / "b")


def test_refuses_a_different_model_at_out_unless_forced_and_raw_weights_work(trained, tmp_path,
                                                                             capsys):
    out = tmp_path / "pub"
    assert publish(trained, out) == 0
    before = sha256_file(out / "model.safetensors")
    assert publish(trained, out) == 0                                   # the same model: fine
    assert publish(trained, out, "publish.weights=raw") == 2            # a different one: refused
    assert "already holds a different model" in capsys.readouterr().err
    assert sha256_file(out / "model.safetensors") == before
    assert publish(trained, out, "publish.weights=raw", "--force") == 0
    assert sha256_file(out / "model.safetensors") == \
        sha256_file(trained["model"] / "model.safetensors") != before
    raw = json.loads(trained["metrics"].read_text())["raw"]
    top1 = [r for r in ModelCard.load(out / "README.md").data.eval_results
            if "Top-1" in r.metric_name]
    assert top1[0].metric_value == round(raw["top1"], 3)               # the raw weights' figures
    ours, _ = load_model_dir(trained["model"], "raw")
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(theirs(x), ours(x))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    assert publish(trained, foreign, "--force") == 2                   # not ours: never replaced
    assert (foreign / "todo.txt").read_text() == "mine"
    assert "not a folder this stage wrote" in capsys.readouterr().err


@pytest.mark.parametrize("tamper", ["reshape", "drop", "nan"])
def test_refuses_tensors_that_do_not_match_the_architecture(trained, tmp_path, capsys, tamper):
    model_dir = tmp_path / "model"
    shutil.copytree(trained["model"], model_dir)
    state = load_file(str(model_dir / "ema.safetensors"))
    if tamper == "reshape":
        state["head.fc.weight"] = torch.zeros(6, 256)
    elif tamper == "drop":
        del state["stem.conv1.weight"]
    else:
        state["stages.0.0.conv1.weight"][0] = float("nan")
    save_file(state, str(model_dir / "ema.safetensors"))
    # without metrics: with them, the changed sha256 is refused first (tested below)
    assert publish(trained, tmp_path / "out", "--no-metrics-ok", model=model_dir,
                   metrics=False) == 2
    err = capsys.readouterr().err
    expected = {"reshape": "head.fc.weight (6, 256)", "drop": "missing ['stem.conv1.weight']",
                "nan": "non-finite values in ['stages.0.0.conv1.weight']"}[tamper]
    assert expected in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("trouble", ["read-only", "full"])
def test_a_read_only_or_full_destination_is_one_line_and_leaves_the_old_folder(
        trained, published, small_filesystem, capsys, trouble):
    """A published folder already there (a previous release), then a publish onto a read-only
    or too small filesystem: exit 1, one line naming the folder and the bytes it needs; the old
    folder as it was, nothing half-written beside it."""
    fs = small_filesystem("2m")
    out = fs / "pub"
    shutil.copytree(published, out)
    before = {f: (out / f).read_bytes() for f in files_in(out)}
    if trouble == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    else:
        fill(fs, 100_000)
    assert publish(trained, out, "--force") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: could not write the published folder "
                                                   f"to {out}: ")
    assert ("read-only filesystem (EROFS)" if trouble == "read-only" else "(ENOSPC); it needs") in error[0]
    assert {f: (out / f).read_bytes() for f in files_in(out)} == before
    assert sorted(p.name for p in fs.iterdir()) == sorted(["pub"] + (["filler"] if trouble == "full" else []))


@pytest.mark.parametrize("network", [{"HF_HUB_OFFLINE": "1"},
                                     {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_no_hub_says_so_leaves_the_folder_complete_and_never_shows_the_token(trained, tmp_path,
                                                                             network):
    out = tmp_path / "pub"
    p = run_stage("publish", "--recipe", RECIPE, "--model", str(trained["model"]), "--metrics",
                  str(trained["metrics"]), "--out", str(out), "--repo", "someone/tiny", check=False,
                  env={**network, "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 3, p.stderr
    assert "Hugging Face Hub cannot be reached" in p.stderr and "local folder" in p.stderr
    assert files_in(out) == FILES
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert sha256_file(out / name) == digest
    assert SECRET not in p.stdout + p.stderr
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]


def test_push_from_the_stage_uses_its_flags_and_prints_the_commit(trained, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = FakeHub(monkeypatch)
    out = tmp_path / "pub"
    code = publish(trained, out, "--repo", "my-org/nfnet-tiny", "--private", "--revision", "v1",
                   "--commit-message", "Tiny NFNet, demo run")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    repo = hub.named("create_repo")[0]
    assert (repo["repo_id"], repo["private"]) == ("my-org/nfnet-tiny", True)
    assert hub.named("create_branch")[0]["branch"] == "v1"
    up = hub.named("upload_folder")[0]
    assert (up["repo_id"], up["revision"], up["commit_message"]) == \
        ("my-org/nfnet-tiny", "v1", "Tiny NFNet, demo run")
    assert files_in(out) == FILES == set(hub.remote[("my-org/nfnet-tiny", "v1")])
    assert "my-org/nfnet-tiny/commit/abc123" in captured.out
    assert 'hf-hub:my-org/nfnet-tiny"' in (out / "README.md").read_text()
    assert SECRET not in captured.out + captured.err
    assert not [f for f in out.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    # publishing the same model again is fine
    assert publish(trained, out, "--repo", "my-org/nfnet-tiny", "--revision", "v1") == 0


def test_push_refusals_exit_2_and_4_with_the_folder_complete(trained, tmp_path, monkeypatch,
                                                             capsys):
    hub = FakeHub(monkeypatch,
                  remote={("org/m", "main"): {"model.safetensors": b"someone else's weights"}})
    out = tmp_path / "pub"
    assert publish(trained, out, "--repo", "org/m") == 2
    err = capsys.readouterr().err
    assert "org/m already holds a different model.safetensors" in err and "--force" in err
    assert not hub.named("upload_folder") and files_in(out) == FILES      # the folder is complete
    assert publish(trained, out, "--repo", "org/m", "--force") == 0
    assert hub.remote[("org/m", "main")]["model.safetensors"] == \
        (out / "model.safetensors").read_bytes()
    monkeypatch.undo()
    FakeHub(monkeypatch, fail_with=http_error(401))
    assert publish(trained, tmp_path / "pub401", "--repo", "org/m") == 4
    err = capsys.readouterr().err
    assert "refused (401)" in err and "HF_TOKEN" in err and "local folder" in err
    assert files_in(tmp_path / "pub401") == FILES


def test_the_stage_prints_the_lineage_notes_and_takes_pretrain_recipe(trained, tmp_path, capsys):
    """A fine-tuned model moved away from its run, its pre-trained one too: both recipes are lost
    until --pretrain-recipe names one; an evaluation at another crop is noted. The moved weights
    are the evaluated bytes, so the metrics still belong to them."""
    pre, model = tmp_path / "pre" / "model", tmp_path / "moved" / "model"
    shutil.copytree(trained["runs"] / "pretrain" / "model", pre)
    shutil.copytree(trained["model"], model)
    ModelConfig.load(model).with_lineage(init=str(pre)).save(model)
    metrics = {**json.loads(trained["metrics"].read_text()), "crop_pct": 0.875}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))

    assert publish(trained, tmp_path / "a", model=model, metrics=tmp_path / "metrics.json") == 0
    out = capsys.readouterr().out
    for stage in ("pretrain", "finetune"):
        assert f"[publish] note: no {stage} recipe.resolved.yaml found from {model}" in out
    assert "(pass --pretrain-recipe)" in out
    assert "[publish] note: evaluated with crop_pct=0.875 (the model folder says 1.0)" in out
    pc = json.loads((tmp_path / "a" / "config.json").read_text())["pretrained_cfg"]
    assert pc["test_crop_pct"] == 0.875 and pc["test_input_size"] == [3, 40, 40]
    given = trained["runs"] / "pretrain" / "recipe.resolved.yaml"
    assert publish(trained, tmp_path / "b", "--pretrain-recipe", str(given), model=model,
                   metrics=tmp_path / "metrics.json") == 0
    assert "no pretrain recipe" not in capsys.readouterr().out
    copied = tmp_path / "b" / "recipes" / "pretrain.resolved.yaml"
    assert copied.read_bytes() == given.read_bytes()


def evaluate(model, shards, out, *overrides) -> dict:
    """The evaluate stage in-process; its metrics.json."""
    assert stage_main("evaluate", ["--recipe", RECIPE, "--model", str(model), "--shards",
                                   str(shards), "--out", str(out), *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_metrics_of_another_model_are_refused_unless_forced(trained, demo_shards, tmp_path,
                                                           capsys):
    """Another model with the same classes and test settings, evaluated for real: only its weights
    differ, and the sha256 shows it."""
    other = tiny_model_dir(tmp_path / "other" / "model")
    foreign = evaluate(other, demo_shards["finetune"], tmp_path / "eval-other")
    capsys.readouterr()
    ours = trained["model"] / "ema.safetensors"
    assert publish(trained, tmp_path / "pub", metrics=tmp_path / "eval-other" / "metrics.json") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "pub").exists()
    for part in (f"--metrics {tmp_path / 'eval-other' / 'metrics.json'} do not match the model "
                 f"being published ({trained['model']}): ema weights: expected the sha256 of "
                 f"{ours} ({sha256_file(ours)[:12]}), got "
                 f"{sha256_file(other / 'ema.safetensors')[:12]} (it scored "
                 f"{other / 'ema.safetensors'}). Re-run the evaluate stage on this model",
                 "or pass --force to publish these figures unchecked"):
        assert part in err, part
    assert "classes:" not in err and "test resolution:" not in err

    assert publish(trained, tmp_path / "pub", "--force",
                   metrics=tmp_path / "eval-other" / "metrics.json") == 0
    captured = capsys.readouterr()
    assert "[publish] warning: --force: --metrics" in captured.err
    assert "config.json keeps the model's own test settings (test_input_size [3, 40, 40])" \
        in captured.err
    card = ModelCard.load(tmp_path / "pub" / "README.md")
    assert "**Not verified**: published with `--force`" in card.text
    top1 = [r for r in card.data.eval_results if "Top-1" in r.metric_name][0]
    assert top1.metric_value == round(foreign["top1"], 3)          # shown, as the figures given
    assert sha256_file(tmp_path / "pub" / "model.safetensors") == sha256_file(ours)


def test_metrics_at_another_resolution_are_refused_and_forced_keep_the_models_size(
        trained, demo_shards, tmp_path, capsys):
    """The model's own weights evaluated at 48 px: config.json must keep 40 px, or timm users run
    the model at a resolution nobody chose for it."""
    evaluate(trained["model"], demo_shards["finetune"], tmp_path / "eval48", "evaluate.test_res=48")
    metrics = tmp_path / "eval48" / "metrics.json"
    capsys.readouterr()
    assert publish(trained, tmp_path / "pub", metrics=metrics) == 2
    err = capsys.readouterr().err
    assert f"({trained['model']}): test resolution: expected config.json " \
           f"pretrained_cfg.test_input_size 40 px, got 48 px. Re-run the evaluate stage" in err
    assert not (tmp_path / "pub").exists()
    assert publish(trained, tmp_path / "pub", "--force", metrics=metrics) == 0
    assert "test_input_size [3, 40, 40]" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "pub" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["test_input_size"] == [3, 40, 40]
    theirs = timm.create_model(f"local-dir:{tmp_path / 'pub'}", pretrained=True)
    test = timm.data.resolve_data_config({}, model=theirs, use_test_size=True)
    assert tuple(test["input_size"]) == (3, 40, 40)
    assert "| ema | 179 | 48 px |" in (tmp_path / "pub" / "README.md").read_text()


def test_metrics_from_before_the_provenance_check_are_refused(trained, tmp_path, capsys):
    old = {k: v for k, v in json.loads(trained["metrics"].read_text()).items() if k != "scored"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert publish(trained, tmp_path / "pub", metrics=tmp_path / "old.json") == 2
    err = capsys.readouterr().err
    assert f"--metrics {tmp_path / 'old.json'} predates the provenance check: it does not " \
           f"record which weights, classes and resolution it scored. Re-run the evaluate stage " \
           f"on this model (python stages/evaluate.py --recipe {RECIPE} --model " \
           f"{trained['model']}" in err and "--force" in err
    assert not (tmp_path / "pub").exists()
    assert publish(trained, tmp_path / "pub", "--force", metrics=tmp_path / "old.json") == 0
    assert "[publish] warning: --force: --metrics" in capsys.readouterr().err
    assert "**Not verified**" in (tmp_path / "pub" / "README.md").read_text()
