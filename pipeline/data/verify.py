"""Check written shards against their manifest: every file present, its sha256, its sample count,
complete samples and labels in range. Used by `stages/shard.py --verify` and after a copy."""
from __future__ import annotations

import os
import re
from pathlib import Path

from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data.manifest import manifest_path, read_manifest
from pipeline.data.shard_reader import HashingReader

DEFAULT_KEYS = {"image": "jpg", "label": "cls", "meta": "json"}


def verify(out: str | os.PathLike) -> list[str]:
    """Check every shard listed in the manifest: present, sha256, sample count, complete samples,
    labels in range. Returns the problems found (empty when all is well); each names the file."""
    out = Path(out)
    info = read_manifest(out)
    num_classes = int(info.get("num_classes") or 0)
    keys = list((info.get("keys") or DEFAULT_KEYS).values())
    problems = []
    for split, s in info["splits"].items():
        if sum(s["shard_lengths"]) != s["num_samples"]:
            problems.append(f"{manifest_path(out)}: split '{split}' num_samples {s['num_samples']} "
                            f"!= the sum of shard_lengths {sum(s['shard_lengths'])}")
        shas = s.get("sha256") or [None] * len(s["filenames"])
        sizes = s.get("sizes") or [None] * len(s["filenames"])
        for name, length, sha, size in zip(s["filenames"], s["shard_lengths"], shas, sizes):
            problems += _verify_shard(out / name, length, sha, size, num_classes, keys)
    return problems


def _verify_shard(path: Path, length: int, sha: str | None, size: int | None, num_classes: int,
                  keys: list[str]) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing (listed in the manifest); re-run the shard stage to rewrite it"]
    problems = []
    actual = path.stat().st_size
    if size is not None and actual != size:
        why = "truncated" if actual < size else "longer than written"
        problems.append(f"{path}: {actual:,} bytes, the manifest says {size:,} ({why}); re-run the "
                        f"shard stage to rewrite it")
    try:
        digest, samples = _scan_tar(path)
    except Exception as e:      # tarfile raises several types on a damaged archive
        # webdataset appends " @ <the file object>" to the message: the path is named already
        reason = re.sub(r" @ <[^>]*>$", "", str(e)) or type(e).__name__
        return problems + [f"{path}: not a readable tar ({reason}); re-run the shard stage to "
                           f"rewrite it"]
    if sha is not None and digest != sha:
        problems.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                        f"{sha[:16]}...; the file changed after it was written: re-run the shard "
                        f"stage to rewrite it")
    if len(samples) != length:
        problems.append(f"{path}: {len(samples)} samples, the manifest says {length}")
    for sample in samples:
        missing = [k for k in keys if k not in sample]
        if missing:
            problems.append(f"{path}: sample '{sample['__key__']}' lacks {', '.join(missing)}")
        elif not 0 <= int(sample["cls"]) < max(num_classes, 1):
            problems.append(f"{path}: sample '{sample['__key__']}' has class {int(sample['cls'])}, "
                            f"outside 0..{num_classes - 1}")
    return problems


def _scan_tar(path: Path) -> tuple[str, list[dict]]:
    """sha256 and the samples (as webdataset groups them, without image data) of one tar."""
    with open(path, "rb") as f:
        reader = HashingReader(f)
        files = ({**x, "__url__": str(path)} for x in tar_file_iterator(reader))
        samples = [{k: (v if k in ("__key__", "cls") else b"") for k, v in s.items()}
                   for s in group_by_keys(files)]
        return reader.finish(), samples
