"""The Hugging Face Hub: push a published folder (pipeline.export) as one commit.

Once pushed, the model loads with `timm.create_model("hf-hub:<org>/<name>", pretrained=True)`.
The token (HF_TOKEN or `hf auth login`) is resolved by huggingface_hub and never seen here; error
messages that quote the Hub have it masked all the same.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

from pipeline.export import WEIGHTS, PublishError
from pipeline.files import sha256_file


class HubUnreachable(PublishError):
    """No answer from the Hub (offline, no network): nothing uploaded."""
    exit_code = 3


class HubRejected(PublishError):
    """The Hub answered with an error (no or bad token, no write access): nothing uploaded."""
    exit_code = 4


def push(folder: Path, repo: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, force: bool = False) -> str:
    """Upload `folder` as one commit to the Hub model repo `repo` (created if needed); the
    revision ends up holding exactly the folder's files. Returns the commit URL.

    Raises HubUnreachable when there is no answer (offline, no network), HubRejected when the Hub
    answers with an error (no or bad token, no write access), PublishError when the repo holds a
    different model and `force` is off. In every case the local folder is complete.
    """
    api = HfApi()         # the token: HF_TOKEN or the stored login, resolved inside huggingface_hub
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if not force:
            _refuse_different_model(api, repo, folder, revision)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 revision=revision, delete_patterns="*",
                                 commit_message=commit_message or f"Publish {folder.name} "
                                 f"({sha256_file(folder / WEIGHTS)[:12]}) from nfnet-pipeline")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "no valid token: set HF_TOKEN or run `hf auth login`",
                403: f"the token may not write to {repo.split('/')[0]}: use a write token"}.get(
                    status, _first_line(e))
        raise HubRejected(f"the Hugging Face Hub refused ({status}): {hint}. Nothing was uploaded; "
                          f"the local folder {folder} is complete") from None
    except _transport_errors() as e:
        raise HubUnreachable(f"the Hugging Face Hub cannot be reached ({type(e).__name__}: "
                             f"{_first_line(e)}); nothing was uploaded. The local folder {folder} "
                             f"is complete: run the same command again when online") from None
    return str(getattr(info, "commit_url", info))


def _refuse_different_model(api: HfApi, repo: str, folder: Path, revision: str | None) -> None:
    """Refuse when `repo` (at `revision`) holds a model.safetensors with other bytes than ours.
    The Hub reports an LFS file's sha256, so nothing is downloaded (*.safetensors are LFS files on
    the Hub; one that is not counts as different)."""
    try:
        remote = [f for f in api.get_paths_info(repo, [WEIGHTS], revision=revision,
                                                 repo_type="model") if f.path == WEIGHTS]
    except RevisionNotFoundError:
        return                                        # a new branch: nothing there to overwrite
    if not remote:
        return
    lfs = getattr(remote[0], "lfs", None)
    if lfs is None or lfs.sha256 != sha256_file(folder / WEIGHTS):
        at = f"{repo}@{revision}" if revision else repo
        raise PublishError(f"{at} already holds a different model.safetensors; nothing was "
                           f"uploaded. Pass --force to replace it, or choose another --repo / "
                           f"--revision (the local folder {folder} is complete)")


def _transport_errors() -> tuple[type, ...]:
    """Exceptions that mean "no answer from the Hub", for whichever HTTP client huggingface_hub
    uses (httpx2 in 2.x, httpx in 1.x, requests before)."""
    found: list[type] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _first_line(e: BaseException) -> str:
    # Hub errors can quote the request; the token must never reach a terminal or a log
    text = (str(e).strip().splitlines() or [""])[0][:200]
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text
