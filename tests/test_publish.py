"""The publish stage on a real tiny trained model (shard -> pretrain -> finetune -> evaluate, at
32-40 px): the folder timm loads, its config, card, recipes and sums, the refusals, the Hub
unreachable for real, and the Hub path up to the call into huggingface_hub (HfApi's network
methods replaced by a recording fake that checks every call against the real signature)."""
import hashlib
import importlib.util
import inspect
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_stage
from pipeline.checkpoint import load_model_dir, save_model_dir
from pipeline.hub import hub_config, meta_model

RECIPE = str(ROOT / "recipes" / "demo.yaml")
SECRET = "hf_NOTaRealTokenButRecognisable0123456789"
FILES = {"model.safetensors", "config.json", "README.md", "metrics.json", "SHA256SUMS",
         "recipes/pretrain.resolved.yaml", "recipes/finetune.resolved.yaml",
         "recipes/publish.resolved.yaml"}

_spec = importlib.util.spec_from_file_location("publish_stage", ROOT / "stages" / "publish.py")
STAGE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(STAGE)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def publish(trained, out, *args, metrics=True, model=None) -> int:
    """The stage in-process (as `python stages/publish.py ...`); returns its exit code."""
    argv = ["--recipe", RECIPE, "--model", str(model or trained["model"]), "--out", str(out),
            *(["--metrics", str(trained["metrics"])] if metrics else []), *args]
    try:
        return STAGE.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained(demo_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run_stage("pretrain", "--recipe", RECIPE, "--shards", str(demo_shards["pretrain"]),
              "--out", str(runs / "pretrain"), "pretrain.epochs=1", "pretrain.warmup_epochs=0.5",
              "pretrain.train_res=32", "pretrain.test_res=32", "pretrain.log_every=50")
    run_stage("finetune", "--recipe", RECIPE, "--init", str(runs / "pretrain" / "model"),
              "--shards", str(demo_shards["finetune"]), "--out", str(runs / "finetune"),
              "finetune.epochs=1", "finetune.warmup_epochs=0.5", "finetune.train_res=32",
              "finetune.test_res=40", "finetune.log_every=50")
    run_stage("evaluate", "--recipe", RECIPE, "--model", str(runs / "finetune" / "model"),
              "--shards", str(demo_shards["finetune"]), "--out", str(runs / "evaluate"))
    return {"runs": runs, "model": runs / "finetune" / "model",
            "metrics": runs / "evaluate" / "metrics.json"}


@pytest.fixture(scope="module")
def published(trained):
    """The real script, as the DVC stage runs it."""
    out = trained["runs"] / "publish"
    p = run_stage("publish", "--recipe", RECIPE, "--model", str(trained["model"]),
                  "--metrics", str(trained["metrics"]), "--out", str(out))
    assert "local-dir:" in p.stdout
    return out


def test_folder_holds_weights_config_card_recipes_and_sums_and_no_pickle(trained, published):
    assert files_in(published) == FILES
    # EMA weights by default, byte for byte the training run's
    assert sha(published / "model.safetensors") == sha(trained["model"] / "ema.safetensors")
    for stage in ("pretrain", "finetune"):
        assert (published / "recipes" / f"{stage}.resolved.yaml").read_bytes() == \
            (trained["runs"] / stage / "recipe.resolved.yaml").read_bytes()
    for f in published.rglob("*"):          # no pickle (0x80 protocol byte) nor torch zip (PK)
        assert f.is_dir() or f.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK")
    sums = dict(reversed(line.split("  ", 1)) for line in (published / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == FILES - {"SHA256SUMS"}
    assert all(sums[name] == sha(published / name) for name in sums)
    assert oct((published).stat().st_mode & 0o777) != oct(0o700)      # not mkdtemp's private mode


def test_timm_loads_the_folder_with_the_evaluate_stage_logits_and_test_preprocessing(trained, published):
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


def test_config_json_is_timms_hub_format(published):
    cfg = json.loads((published / "config.json").read_text())
    assert cfg["architecture"] == "dm_nfnet_f0" and cfg["model_args"]["channels"] == [32, 64, 96, 128]
    assert cfg["num_classes"] == 5 and cfg["num_features"] == 256 and cfg["global_pool"] == "avg"
    assert cfg["label_names"] == ["5", "6", "7", "8", "9"]
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["test_input_size"] == [3, 40, 40]
    assert (pc["crop_pct"], pc["crop_mode"], pc["interpolation"]) == (1.0, "squash", "bicubic")
    assert len(pc["mean"]) == len(pc["std"]) == 3
    assert (pc["classifier"], pc["first_conv"], pc["license"]) == ("head.fc", "stem.conv1", "apache-2.0")


def test_model_card_front_matter_and_body(trained, published):
    metrics = json.loads(trained["metrics"].read_text())
    card = ModelCard.load(published / "README.md")        # huggingface_hub's own parser
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["sklearn-digits"] and "nfnet" in card.data.tags
    results = {r.metric_name: r for r in card.data.eval_results}
    top1 = results["Top-1 accuracy (%)"]
    assert top1.metric_value == round(metrics["top1"], 3) and top1.dataset_split == "val"
    assert results["Top-5 accuracy (%)"].metric_value == round(metrics["top5"], 3)
    pre = yaml.safe_load((trained["runs"] / "pretrain" / "recipe.resolved.yaml").read_text())
    fin = yaml.safe_load((trained["runs"] / "finetune" / "recipe.resolved.yaml").read_text())
    body = card.text
    for fact in ("variant `tiny`", f"{pre['resolved']['num_samples']} training images",
                 f"{fin['resolved']['num_samples']} training images",
                 f"= {fin['resolved']['total_steps']} steps", "train 32 px, test 40 px",
                 "finetune.test_res=40", "local-dir:", "use_test_size=True", "## Limits",
                 f"{metrics['num_samples']} held-out images"):
        assert fact in body, fact


def test_f_variants_timm_does_not_name_rebuild_from_config_json(tmp_path):
    from pipeline.checkpoint import model_config
    from pipeline.variants import build_model, count_params
    for variant in ("f7", "f4+"):
        model, arch, args = build_model(variant, 1000, device="meta")
        config = model_config(model, arch, args, [str(i) for i in range(1000)], 224, 256, 0.9,
                              "bicubic", {"variant": variant})
        folder = tmp_path / variant
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hub_config(config, meta_model(config))))
        with torch.device("meta"):
            rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=False)
        assert count_params(rebuilt) == count_params(model) != \
            count_params(timm.create_model(arch, pretrained=False, num_classes=1000, device="meta"))


def test_a_batchnorm_resnet_publishes_with_its_own_layer_names(tmp_path, capsys):
    """A non-NFNet timm model, its folder's config naming NFNet layers on purpose: the export reads
    the classifier and first conv from the built model, and timm's head swap relies on them."""
    args = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
    model = timm.create_model("resnet18", num_classes=3, **args)
    model.train()
    with torch.no_grad():                 # non-trivial batch-norm running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    config = {"architecture": "resnet18", "model_args": args, "num_classes": 3, "num_features": 64,
              "global_pool": "avg", "label_names": ["a", "b", "c"],
              "pretrained_cfg": {"input_size": [3, 32, 32], "test_input_size": [3, 32, 32],
                                 "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear",
                                 "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "classifier": "head.fc", "first_conv": "stem.conv1"}}
    model_dir = save_model_dir(tmp_path / "run" / "model", model, None, config)
    out = tmp_path / "pub"
    code = publish(None, out, "--no-metrics-ok", "publish.weights=raw", metrics=False, model=model_dir)
    assert code == 0, capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["pretrained_cfg"]["classifier"], cfg["pretrained_cfg"]["first_conv"]) == ("fc", "conv1")
    assert cfg["num_features"] == 64 and cfg["global_pool"] == "avg"
    ours, _ = load_model_dir(model_dir, "raw")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    assert timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10).fc.out_features == 10
    card = ModelCard.load(out / "README.md")
    assert not card.data.eval_results and "Not evaluated" in card.text and "NFNet image" not in card.text


def test_refuses_to_publish_without_metrics_unless_told(trained, tmp_path, capsys):
    assert publish(trained, tmp_path / "a", metrics=False) == 2
    assert "no evaluation metrics" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert publish(trained, tmp_path / "b", "--no-metrics-ok", metrics=False) == 0
    assert not ModelCard.load(tmp_path / "b" / "README.md").data.eval_results
    assert "metrics.json" not in files_in(tmp_path / "b")


def test_refuses_a_different_model_at_out_unless_forced_and_raw_weights_work(trained, tmp_path, capsys):
    out = tmp_path / "pub"
    assert publish(trained, out) == 0
    before = sha(out / "model.safetensors")
    assert publish(trained, out) == 0                                   # the same model: fine
    assert publish(trained, out, "publish.weights=raw") == 2            # a different one: refused
    assert "already holds a different model" in capsys.readouterr().err
    assert sha(out / "model.safetensors") == before
    assert publish(trained, out, "publish.weights=raw", "--force") == 0
    assert sha(out / "model.safetensors") == sha(trained["model"] / "model.safetensors") != before
    raw = json.loads(trained["metrics"].read_text())["raw"]
    top1 = [r for r in ModelCard.load(out / "README.md").data.eval_results if "Top-1" in r.metric_name]
    assert top1[0].metric_value == round(raw["top1"], 3)               # the raw weights' figures
    ours, _ = load_model_dir(trained["model"], "raw")
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), ours(x))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    assert publish(trained, foreign, "--force") == 2                   # not ours: never replaced
    assert (foreign / "todo.txt").read_text() == "mine" and "not a folder this stage wrote" in capsys.readouterr().err


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
    assert publish(trained, tmp_path / "out", model=model_dir) == 2
    err = capsys.readouterr().err
    expected = {"reshape": "head.fc.weight (6, 256)", "drop": "missing ['stem.conv1.weight']",
                "nan": "non-finite values in ['stages.0.0.conv1.weight']"}[tamper]
    assert expected in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("network", [{"HF_HUB_OFFLINE": "1"},
                                     {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_no_hub_says_so_leaves_the_folder_complete_and_never_shows_the_token(trained, tmp_path, network):
    out = tmp_path / "pub"
    p = run_stage("publish", "--recipe", RECIPE, "--model", str(trained["model"]), "--metrics",
                  str(trained["metrics"]), "--out", str(out), "--repo", "someone/tiny", check=False,
                  env={**network, "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 3, p.stderr
    assert "Hugging Face Hub cannot be reached" in p.stderr and "local folder" in p.stderr
    assert files_in(out) == FILES
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert sha(out / name) == digest
    assert SECRET not in p.stdout + p.stderr
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]


class FakeHub:
    """HfApi's network methods, recorded. Each call is bound to the real method's signature first,
    so a call the real HfApi would reject fails here too. `remote[(repo, branch)]` holds the files
    (path -> bytes) already on the Hub."""
    METHODS = ("create_repo", "create_branch", "get_paths_info", "upload_folder", "create_commit",
               "hf_hub_download")

    def __init__(self, monkeypatch, remote=None, fail_with=None):
        self.calls, self.remote, self.fail_with = [], dict(remote or {}), fail_with
        for name in self.METHODS:
            monkeypatch.setattr(HfApi, name, self._recorder(name, inspect.signature(getattr(HfApi, name))))

    def _recorder(self, name, sig):
        def fake(api, *args, **kwargs):
            call = dict(sig.bind(api, *args, **kwargs).arguments)
            call.pop("self")
            self.calls.append((name, call))
            if self.fail_with is not None:
                raise self.fail_with
            return getattr(self, name)(**call)
        return fake

    def named(self, name):
        return [c for n, c in self.calls if n == name]

    def create_repo(self, repo_id, **kw):
        from huggingface_hub.hf_api import RepoUrl
        self.remote.setdefault((repo_id, "main"), {})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, branch, **kw):
        self.remote.setdefault((repo_id, branch), dict(self.remote[(repo_id, "main")]))

    def get_paths_info(self, repo_id, paths, revision=None, **kw):
        from huggingface_hub.hf_api import RepoFile
        if (repo_id, revision or "main") not in self.remote:
            raise http_error(404, {"X-Error-Code": "RevisionNotFound"})
        files = self.remote[(repo_id, revision or "main")]
        return [RepoFile(path=p, size=len(files[p]), oid="0" * 40,
                         lfs={"size": len(files[p]), "oid": hashlib.sha256(files[p]).hexdigest(),
                              "pointerSize": 130}) for p in paths if p in files]

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None, **kw):
        from huggingface_hub.hf_api import CommitInfo
        folder = Path(folder_path)
        self.remote[(repo_id, revision or "main")] = {f: (folder / f).read_bytes() for f in files_in(folder)}
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123",
                          commit_message=commit_message, commit_description="", oid="abc123")

    def create_commit(self, **kw):
        raise AssertionError("publishing is one upload_folder call")

    hf_hub_download = create_commit


def http_error(status, headers=None):
    """The exception huggingface_hub raises for this HTTP answer, made by its own code."""
    httpx = pytest.importorskip("httpx2")
    from huggingface_hub.utils import hf_raise_for_status
    response = httpx.Response(status, headers=headers or {}, request=httpx.Request("GET", "https://hub.test/api"))
    try:
        hf_raise_for_status(response)
    except Exception as e:         # noqa: BLE001 - returned to be raised by the fake
        return e
    raise AssertionError(f"no error for status {status}")


def test_push_is_one_commit_of_the_folder_to_the_named_repo_and_branch(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = FakeHub(monkeypatch)
    out = tmp_path / "pub"
    code = publish(trained, out, "--repo", "my-org/nfnet-tiny", "--private", "--revision", "v1",
                   "--commit-message", "Tiny NFNet, demo run")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [n for n, _ in hub.calls] == ["create_repo", "get_paths_info", "create_branch", "upload_folder"]
    repo = hub.named("create_repo")[0]
    assert (repo["repo_id"], repo["private"], repo["exist_ok"], repo["repo_type"]) == \
        ("my-org/nfnet-tiny", True, True, "model")
    assert hub.named("create_branch")[0]["branch"] == "v1"
    up = hub.named("upload_folder")[0]
    assert (up["repo_id"], up["revision"], up["commit_message"]) == ("my-org/nfnet-tiny", "v1", "Tiny NFNet, demo run")
    assert up["delete_patterns"] == "*"                 # the branch ends up holding exactly the folder
    assert files_in(out) == FILES == set(hub.remote[("my-org/nfnet-tiny", "v1")])
    assert all("token" not in c or c["token"] is None for _, c in hub.calls)   # huggingface_hub resolves it
    assert "my-org/nfnet-tiny/commit/abc123" in captured.out
    assert 'hf-hub:my-org/nfnet-tiny"' in (out / "README.md").read_text()
    assert SECRET not in captured.out + captured.err
    assert not [f for f in out.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    # publishing the same model again is fine; a default commit message names the weights
    assert publish(trained, out, "--repo", "my-org/nfnet-tiny", "--revision", "v1") == 0
    assert sha(out / "model.safetensors")[:12] in hub.named("upload_folder")[1]["commit_message"]


def test_push_refuses_a_different_model_in_the_repo_unless_forced(trained, tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, remote={("org/m", "main"): {"model.safetensors": b"someone else's weights"}})
    out = tmp_path / "pub"
    assert publish(trained, out, "--repo", "org/m") == 2
    err = capsys.readouterr().err
    assert "org/m already holds a different model.safetensors" in err and "--force" in err
    assert not hub.named("upload_folder") and files_in(out) == FILES      # the folder is complete
    assert publish(trained, out, "--repo", "org/m", "--force") == 0
    assert hub.remote[("org/m", "main")]["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_push_says_when_the_hub_rejects_the_token(trained, tmp_path, monkeypatch, capsys):
    FakeHub(monkeypatch, fail_with=http_error(401))
    assert publish(trained, tmp_path / "pub", "--repo", "org/m") == 4
    err = capsys.readouterr().err
    assert "refused (401)" in err and "HF_TOKEN" in err and "local folder" in err
