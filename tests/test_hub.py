"""pipeline.hub.push up to the call into huggingface_hub: HfApi's network methods are replaced by a
recording fake that checks every call against the real signature, and the Hub's HTTP errors are
made by huggingface_hub's own code. The folder is a real exported one (an untrained tiny NFNet).
The Hub unreachable for real, and the stage's exit codes: tests/test_publish.py."""
import hashlib
import inspect
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from test_export import files_in, publish_section, tiny_model_dir

from pipeline.export import PublishError, export_folder
from pipeline.hub import HubRejected, HubUnreachable, push
from pipeline.io import sha256_file

SECRET = "hf_NOTaRealTokenButRecognisable0123456789"


class FakeHub:
    """HfApi's network methods, recorded. Each call is bound to the real method's signature first,
    so a call the real HfApi would reject fails here too. `remote[(repo, branch)]` holds the files
    (path -> bytes) already on the Hub."""
    METHODS = ("create_repo", "create_branch", "get_paths_info", "upload_folder", "create_commit",
               "hf_hub_download")

    def __init__(self, monkeypatch, remote=None, fail_with=None):
        self.calls, self.remote, self.fail_with = [], dict(remote or {}), fail_with
        for name in self.METHODS:
            monkeypatch.setattr(HfApi, name,
                                self._recorder(name, inspect.signature(getattr(HfApi, name))))

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
        self.remote[(repo_id, revision or "main")] = {f: (folder / f).read_bytes()
                                                      for f in files_in(folder)}
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123",
                          commit_message=commit_message, commit_description="", oid="abc123")

    def create_commit(self, **kw):
        raise AssertionError("publishing is one upload_folder call")

    hf_hub_download = create_commit


def http_error(status, headers=None):
    """The exception huggingface_hub raises for this HTTP answer, made by its own code."""
    httpx = pytest.importorskip("httpx2")
    from huggingface_hub.utils import hf_raise_for_status
    response = httpx.Response(status, headers=headers or {},
                              request=httpx.Request("GET", "https://hub.test/api"))
    try:
        hf_raise_for_status(response)
    except Exception as e:         # noqa: BLE001 - returned to be raised by the fake
        return e
    raise AssertionError(f"no error for status {status}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    return export_folder(tiny_model_dir(root / "run" / "model"), root / "pub", publish_section(),
                         None, {})


def test_push_is_one_commit_of_the_folder_to_the_named_repo_and_branch(folder, monkeypatch,
                                                                       capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = FakeHub(monkeypatch)
    url = push(folder, "my-org/nfnet-tiny", private=True, revision="v1",
               commit_message="Tiny NFNet, demo run")
    assert [n for n, _ in hub.calls] == ["create_repo", "get_paths_info", "create_branch",
                                         "upload_folder"]
    repo = hub.named("create_repo")[0]
    assert (repo["repo_id"], repo["private"], repo["exist_ok"], repo["repo_type"]) == \
        ("my-org/nfnet-tiny", True, True, "model")
    assert hub.named("create_branch")[0]["branch"] == "v1"
    up = hub.named("upload_folder")[0]
    assert (up["repo_id"], up["revision"], up["commit_message"]) == \
        ("my-org/nfnet-tiny", "v1", "Tiny NFNet, demo run")
    assert up["delete_patterns"] == "*"         # the branch ends up holding exactly the folder
    assert files_in(folder) == set(hub.remote[("my-org/nfnet-tiny", "v1")])
    # no token passed: huggingface_hub resolves it
    assert all("token" not in c or c["token"] is None for _, c in hub.calls)
    assert "my-org/nfnet-tiny/commit/abc123" in url
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    # publishing the same model again is fine; a default commit message names the weights
    push(folder, "my-org/nfnet-tiny", revision="v1")
    assert sha256_file(folder / "model.safetensors")[:12] in \
        hub.named("upload_folder")[1]["commit_message"]


def test_push_refuses_a_different_model_in_the_repo_unless_forced(folder, monkeypatch):
    hub = FakeHub(monkeypatch,
                  remote={("org/m", "main"): {"model.safetensors": b"someone else's weights"}})
    with pytest.raises(PublishError) as e:
        push(folder, "org/m")
    assert e.value.exit_code == 2
    assert "org/m already holds a different model.safetensors" in str(e.value)
    assert "--force" in str(e.value) and "local folder" in str(e.value)
    assert not hub.named("upload_folder")
    hub.remote[("org/m", "v2")] = hub.remote[("org/m", "main")]
    with pytest.raises(PublishError, match="org/m@v2 already holds"):
        push(folder, "org/m", revision="v2")
    push(folder, "org/m", force=True)
    assert hub.remote[("org/m", "main")]["model.safetensors"] == \
        (folder / "model.safetensors").read_bytes()


def test_push_says_when_the_hub_rejects_the_token(folder, monkeypatch):
    FakeHub(monkeypatch, fail_with=http_error(401))
    with pytest.raises(HubRejected) as e:
        push(folder, "org/m")
    assert e.value.exit_code == 4
    assert "refused (401)" in str(e.value) and "HF_TOKEN" in str(e.value)
    assert "local folder" in str(e.value)


def test_no_answer_is_unreachable_and_the_token_is_masked_in_what_the_hub_said(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    FakeHub(monkeypatch, fail_with=ConnectionError(f"no route for Bearer {SECRET}\nmore"))
    with pytest.raises(HubUnreachable) as e:
        push(folder, "org/m")
    assert e.value.exit_code == 3 and isinstance(e.value, PublishError)
    assert "cannot be reached (ConnectionError: no route for Bearer ***)" in str(e.value)
    assert SECRET not in str(e.value) and "run the same command again" in str(e.value)
