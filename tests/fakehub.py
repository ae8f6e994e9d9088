"""A recording stand-in for huggingface_hub's HfApi network methods, and the Hub's HTTP errors
as huggingface_hub itself raises them (tests of pipeline/hub.py and the publish stage)."""
import hashlib
import inspect
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import files_in

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
