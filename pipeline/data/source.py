"""What every shard-stage source is made of: the `Source` and its splits, errors, shared helpers.

A split is (image bytes, label) by sample index. The writer permutes samples across shards, so
every split is random-access by index. It is also compact: at ImageNet-21k scale (13 M images) the
per-sample state is flat arrays (names in one bytes blob, labels in int32), which forked workers
share without copying; nothing is decoded up front.

The kinds of source live in folder_source.py, hf_source.py and tar_source.py; open_source.py picks one
from `--source`. This module imports none of them.
"""
from __future__ import annotations

import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".avif"})


class SourceError(ValueError):
    """The source cannot be sharded as given; the message names the path or key and the fix."""


class SourceSplit(Protocol):
    """What the writer needs from one split of a source."""
    name: str
    labels: np.ndarray          # int32, one per sample, already checked against the class list
    fingerprint: str            # changes when the split's content changes (part of the shard plan)
    ignored: int                # non-image files passed over while enumerating

    def __len__(self) -> int: ...
    def relname(self, i: int) -> str: ...               # stable name for reports and the plan
    def read(self, i: int) -> tuple[bytes, str]: ...    # (raw image bytes, original file name)


@dataclass
class Source:
    """An opened source: its class names and its splits, every label checked against them."""
    kind: str                               # "folder" | "hf" | "tars"
    location: str                           # the --source spec as given
    class_names: list[str]
    splits: dict[str, SourceSplit]
    ignored_examples: list[str] = field(default_factory=list)   # a few ignored non-image files

    @property
    def ignored(self) -> int:
        return sum(s.ignored for s in self.splits.values())


class NameTable:
    """Many strings in one bytes blob plus end offsets.

    A list of 13 M Python strings costs ~1 GB and every forked worker touches its refcounts (so the
    pages get copied); a blob and an int64 array cost ~1/3 of that and stay shared.
    """

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")

    def append(self, s: str) -> None:
        self._blob += s.encode("utf-8", "surrogateescape")
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i else 0
        return self._blob[start:self._ends[i]].decode("utf-8", "surrogateescape")


def is_image_name(name: str) -> bool:
    """True for a visible file with an image extension (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def resolve_path(value: str, source_root: Path, key: str) -> Path:
    """A recipe path: absolute, relative to the working directory, or relative to the source."""
    p = Path(value)
    for cand in ([p] if p.is_absolute() else [p, source_root / p]):
        if cand.is_file():
            return cand
    tried = p if p.is_absolute() else f"{p.resolve()} and {(source_root / p).resolve()}"
    raise SourceError(f"shard.{key} file not found: {value} (tried {tried})")


def read_class_list(path: Path) -> list[str]:
    """One class name per line (the whole line, stripped); blank lines and '#' comments skipped."""
    names = [ln.strip() for ln in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    dup = sorted(n for n, k in Counter(names).items() if k > 1)
    if not names or dup:
        why = "is empty" if not names else f"repeats {', '.join(dup[:5])}"
        raise SourceError(f"class list {path} {why}; it needs one distinct class name per line")
    return names
