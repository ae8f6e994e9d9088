"""pipeline.hub.push up to the call into huggingface_hub: HfApi's network methods are replaced by a
recording fake that checks every call against the real signature, and the Hub's HTTP errors are
made by huggingface_hub's own code. The folder is a real exported one (an untrained tiny NFNet).
The Hub unreachable for real, and the stage's exit codes: tests/test_publish.py."""
from pathlib import Path

import pytest
from fakehub import SECRET, FakeHub, http_error

from conftest import files_in, publish_section, tiny_model_dir
from pipeline.export import PublishError, export_folder
from pipeline.files import sha256_file
from pipeline.hub import HubRejected, HubUnreachable, push


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
