"""Existing webdataset tars as a shard-stage source: re-shard to another shard size or image size.

Splits come from the folder's `_info.json` when it has one (an earlier shard stage's output, which
also gives the class names), else from file names `<split>-*.tar` / `<split>_*.tar` (all tars when
one split is asked for and no name matches). Samples are grouped the way webdataset groups them
(consecutive members sharing the basename up to its first dot,
`webdataset.tariterators.base_plus_ext`); the image is the first of jpg/jpeg/png/webp/... present
and the label is the `cls` member.

Why an index of our own rather than a webdataset pipeline: the writer permutes samples across
shards, which needs random access, and webdataset only streams. One pass over the tar headers
(seeking over the data) records each sample's tar, offsets and sizes in flat arrays, compact enough
for 13 M samples; reads are then one seek each.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from array import array
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.data.source import NameTable, Source, SourceError, read_class_list, resolve_path
from pipeline.recipe import ShardSection

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


class TarSplit:
    def __init__(self, name: str, tars: list[str]):
        self.name, self.tars = name, tars
        self.tar_index, self.labels_list = array("i"), array("i")
        self.img_offset, self.img_size = array("q"), array("q")
        self.meta_offset, self.meta_size = array("q"), array("q")     # -1: no json member
        self.keys = NameTable()
        self.labels = np.zeros(0, np.int32)
        self.ignored = 0
        stats = [os.stat(t) for t in tars]
        # Tars named alike can differ in content: size and mtime stand in for a content hash.
        self.fingerprint = ",".join(f"{Path(t).name}:{s.st_size}:{s.st_mtime_ns}"
                                    for t, s in zip(tars, stats, strict=True))
        self._handles: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def relname(self, i: int) -> str:
        return f"{Path(self.tars[self.tar_index[i]]).name}/{self.keys[i]}"

    def read(self, i: int) -> tuple[bytes, str]:
        data = self._read(self.tar_index[i], self.img_offset[i], self.img_size[i])
        name = self.relname(i)
        if self.meta_size[i] >= 0:      # keep the original file name through a re-shard
            try:
                meta = json.loads(self._read(self.tar_index[i], self.meta_offset[i],
                                             self.meta_size[i]))
                name = str(meta.get("file") or name) if isinstance(meta, dict) else name
            except ValueError:
                pass
        return data, name

    def _read(self, t: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():    # handles opened before a fork must not be shared
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(t)
        if f is None:
            f = self._handles[t] = open(self.tars[t], "rb")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}, "_pid": -1}

    def index(self) -> None:
        """One pass over the tar headers; cls labels are read here so they are checked up front."""
        for t, path in enumerate(self.tars):
            try:
                with tarfile.open(path, "r:") as tf:
                    self._index_tar(t, path, tf)
            except (tarfile.TarError, OSError) as e:
                raise SourceError(f"{path} is not a readable tar ({e}); remove it or re-create "
                                  f"it") from None
        self.labels = np.frombuffer(self.labels_list, np.int32).copy()

    def _index_tar(self, t: int, path: str, tf: tarfile.TarFile) -> None:
        group: dict[str, tarfile.TarInfo] = {}
        key = None
        for m in tf:
            if not m.isreg():
                continue
            prefix, ext = base_plus_ext(m.name)
            if prefix is None:
                self.ignored += 1
                continue
            if prefix != key:
                self._add(t, path, tf, key, group)
                key, group = prefix, {}
            group[ext.lower()] = m
        self._add(t, path, tf, key, group)

    def _add(self, t: int, path: str, tf: tarfile.TarFile, key, group: dict) -> None:
        if key is None:
            return
        img = next((group[k] for k in IMAGE_KEYS if k in group), None)
        if img is None:
            self.ignored += 1           # a sample without an image, e.g. metadata only
            return
        if "cls" not in group:
            raise SourceError(f"sample '{key}' in {path} has no .cls label; re-sharding needs "
                              f"one per sample")
        raw = tf.extractfile(group["cls"]).read().strip()
        try:
            label = int(raw)
        except ValueError:
            raise SourceError(f"sample '{key}' in {path}: .cls is {raw[:20]!r}, not an integer "
                              f"class index") from None
        meta = group.get("json")
        self.tar_index.append(t)
        self.labels_list.append(label)
        self.img_offset.append(img.offset_data)
        self.img_size.append(img.size)
        self.meta_offset.append(meta.offset_data if meta else -1)
        self.meta_size.append(meta.size if meta else -1)
        self.keys.append(key)


def open_tars(spec: str, tars: list[str], section: ShardSection) -> Source:
    """Tars assigned to the recipe's splits, indexed in one pass; labels checked against the
    class names (shard.class_list, else the tars' _info.json, else the class indices)."""
    root = Path(spec) if Path(spec).is_dir() else Path(tars[0]).parent
    manifest = root / "_info.json"
    info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    by_split = _assign_tars(spec, root, tars, info, section.splits)
    if section.class_list:
        class_names = read_class_list(resolve_path(section.class_list, root, "class_list"))
        origin = f"the class list {section.class_list}"
    else:
        class_names, origin = list(info.get("class_names") or []), f"the class names in {manifest}"
    splits = {}
    for split, files in by_split.items():
        s = TarSplit(split, files)
        s.index()
        if not len(s):
            raise SourceError(f"tars for split '{split}' in {spec} hold no samples with an image "
                              f"and a .cls label")
        splits[split] = s
    if not class_names:     # no names anywhere: the class indices found, as strings
        class_names = [str(i) for i in range(max(int(s.labels.max()) for s in splits.values()) + 1)]
        origin = "the .cls labels"
    for s in splits.values():
        bad = np.flatnonzero((s.labels < 0) | (s.labels >= len(class_names)))
        if bad.size:
            raise SourceError(f"sample {s.relname(int(bad[0]))} has label {s.labels[bad[0]]}, "
                              f"outside {origin} ({len(class_names)} classes); fix the class "
                              f"list (shard.class_list) or the tars")
    return Source("tars", spec, class_names, splits)


def _assign_tars(spec: str, root: Path, tars: list[str], info: dict, splits: list[str]) -> dict:
    out = {}
    for split in splits:
        listed = (info.get("splits") or {}).get(split, {}).get("filenames")
        if listed:
            files = [str(root / f) for f in listed]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise SourceError(f"{missing[0]} is listed in {root / '_info.json'} but missing")
        else:
            pat = re.compile(rf"^{re.escape(split)}([-_.]|$)")
            files = [t for t in tars if pat.match(Path(t).stem)]
        if files:
            out[split] = files
    if not out and len(splits) == 1 and tars:
        return {splits[0]: tars}
    missing = [s for s in splits if s not in out]
    if missing:
        shown = ", ".join(Path(t).name for t in tars[:8]) or "none"
        raise SourceError(f"no tars for split(s) {', '.join(missing)} in {spec} (tars: {shown}); "
                          f"name them <split>-*.tar or set shard.splits")
    return out
