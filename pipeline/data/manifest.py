"""The shard manifest `_info.json`: the contract between the shard stage and every reader.

timm's webdataset reader (`timm/data/readers/reader_wds.py`) accepts it as is: it reads
`splits.<split>.{name, num_samples, filenames, shard_lengths}`. We add, per split, the sha256 of
every shard and the skipped-input count, and at the top the class names and the shard recipe.

    {
      "format": "nfnet-pipeline/shards/1",
      "num_classes": 5, "class_names": ["0", "1", ...],
      "keys": {"image": "jpg", "label": "cls", "meta": "json"},
      "recipe": {...the shard section...},
      "splits": {
        "train": {"name": "train", "num_samples": 1000,
                  "filenames": ["train-000000.tar", ...], "shard_lengths": [256, ...],
                  "sha256": ["...", ...], "sizes": [bytes, ...], "skipped": 0}
      }
    }
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.source import is_image_name
from pipeline.files import atomic_write_text

MANIFEST_NAME = "_info.json"
FORMAT = "nfnet-pipeline/shards/1"


class ManifestError(ValueError):
    """The manifest or a shard does not match; the message names the file and the fix."""


@dataclass(frozen=True)
class SplitInfo:
    """One split of a sharded dataset, with absolute shard paths (or URLs)."""
    name: str
    urls: tuple[str, ...]
    shard_lengths: tuple[int, ...]
    sha256: tuple[str, ...]
    num_classes: int
    class_names: tuple[str, ...]
    sizes: tuple[int, ...] = ()          # bytes per shard (manifests before 2026-12 have none)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)


def manifest_path(root: str | os.PathLike) -> Path:
    return Path(root) / MANIFEST_NAME


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(root)
    if not path.is_file():
        raise ManifestError(f"no shard manifest at {path}: {_how_to_shard(Path(root))}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-run the shard stage") from None
    if "splits" not in info:
        raise ManifestError(f"{path} has no 'splits'; it was not written by the shard stage")
    return info


def is_local(url: str) -> bool:
    """A file path, not a URL or a `pipe:` command."""
    return "://" not in url and not url.startswith("pipe:")


# The held-out split under the names datasets give it (HF datasets: "validation").
VAL_NAMES = ("val", "validation", "valid")


def split_name(splits: Iterable[str], split: str) -> str | None:
    """`split` as the manifest names it, or None: "val" also finds "validation" or "valid" (and
    each of them the others), so shards of an HF dataset's `validation` split validate training."""
    splits = list(splits)
    if split in splits:
        return split
    if split in VAL_NAMES:
        return next((n for n in VAL_NAMES if n in splits), None)
    return None


def load_split(root: str | os.PathLike, split: str, shard_url: str | None = None) -> SplitInfo:
    """The named split of the shards at `root`.

    `shard_url` reads the tars from elsewhere (object storage, HTTP) with the manifest at `root`:
    a template with `{name}` for the shard file name, in any form webdataset opens, e.g.
    `pipe:aws s3 cp s3://bucket/imagenet/{name} -` or `https://host/shards/{name}`. Local shard
    paths are checked to exist.
    """
    info = read_manifest(root)
    found = split_name(info["splits"], split)
    if found is None:
        raise ManifestError(f"split '{split}' is not in {manifest_path(root)}; it has: "
                            f"{', '.join(info['splits'])}")
    split = found
    if shard_url is not None and "{name}" not in shard_url:
        raise ManifestError(f"--shard-url {shard_url!r} needs a {{name}} placeholder for the "
                            f"shard file name, e.g. 'pipe:aws s3 cp s3://bucket/shards/{{name}} -'")
    s = info["splits"][split]
    urls = []
    for name in s["filenames"]:
        if shard_url is not None:
            urls.append(shard_url.replace("{name}", name))
            continue
        url = os.path.join(str(root), name) if is_local(name) else name
        if is_local(url) and not os.path.isfile(url):
            raise ManifestError(f"shard {url} listed in {manifest_path(root)} is missing; "
                                f"re-run the shard stage (it reuses shards that are intact)")
        urls.append(url)
    lengths = tuple(int(n) for n in s["shard_lengths"])
    if len(lengths) != len(urls) or sum(lengths) != int(s["num_samples"]):
        raise ManifestError(f"{manifest_path(root)}: split '{split}' has inconsistent "
                            f"num_samples / shard_lengths / filenames")
    class_names = tuple(info.get("class_names") or ())
    num_classes = int(info.get("num_classes") or len(class_names))
    return SplitInfo(split, tuple(urls), lengths, tuple(s.get("sha256") or ()), num_classes,
                     class_names, tuple(int(b) for b in s.get("sizes") or ()))


def _how_to_shard(root: Path) -> str:
    """The fix for a folder without a manifest: a folder of images or tars is a source to shard
    into a folder of its own (the shard stage refuses --out inside its --source)."""
    found = _first_source_file(root)
    if found is None:
        return (f"run the shard stage first (python stages/shard.py --recipe <recipe> --source "
                f"<images> --out {root})")
    kind = "tar files" if found.suffix == ".tar" else "images"
    return (f"{root} holds {kind} ({found}), not the shard stage's output: shard them into a "
            f"folder of their own and pass that (python stages/shard.py --recipe <recipe> "
            f"--source {root} --out <shards folder outside it>)")


def _first_source_file(root: Path, depth: int = 3) -> Path | None:
    """An image or a tar within `depth` folder levels of `root` (split/class/file)."""
    if not root.is_dir():
        return None
    for entry in sorted(root.iterdir()):
        if entry.is_file() and (is_image_name(entry.name) or entry.suffix.lower() == ".tar"):
            return entry
        if entry.is_dir() and depth > 1:
            found = _first_source_file(entry, depth - 1)
            if found is not None:
                return found
    return None


def write_manifest(root: str | os.PathLike, info: dict[str, Any]) -> Path:
    info = {"format": FORMAT, **info}
    path = manifest_path(root)
    atomic_write_text(path, json.dumps(info, indent=1, sort_keys=False) + "\n")
    return path
