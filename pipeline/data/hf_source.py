"""Hugging Face `datasets` sources for the shard stage: save_to_disk folders, parquet, the Hub.

Specs: a save_to_disk folder (has dataset_dict.json or state.json), parquet files (one file, a glob
or a folder; a file belongs to split S when its name starts with `S-`, `S_`, `S.` or it sits in a
folder named S; with one split asked for and no such names, all files are that split), or
`hf:<name>[:<config>]` loaded from the Hub (online only).

The image and label columns are `shard.image_column` / `shard.label_column`. Class names come from
the label column's `ClassLabel` feature, else `shard.class_list`, else the sorted distinct values.
The recipe's `val` also finds a dataset's `validation` split (and the reverse).
Rows are read by index from the memory-mapped Arrow files, images as the stored encoded bytes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from pipeline.data.source import Source, SourceError, read_class_list, resolve_path
from pipeline.recipe import ShardSection

_ALIASES = {"val": ("validation", "valid"), "validation": ("val", "valid"),
            "valid": ("validation", "val")}


class HFSplit:
    """One split of a `datasets.Dataset`, image column left encoded (decode=False)."""

    def __init__(self, name: str, ds, image_column: str, labels: np.ndarray, where: str):
        self.name, self.ds, self.image_column, self.labels = name, ds, image_column, labels
        self.where = where                                  # the dataset's own split name
        self.fingerprint = str(getattr(ds, "_fingerprint", "") or "")
        self.ignored = 0

    def __len__(self) -> int:
        return len(self.ds)

    def relname(self, i: int) -> str:
        return f"{self.where}/{i}"

    def read(self, i: int) -> tuple[bytes, str]:
        value = self.ds[int(i)][self.image_column]
        if isinstance(value, dict):                         # Image(decode=False): bytes and/or path
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = bytes(value), None
        else:                                               # a string column of file paths
            data, path = None, value
        if data is None:
            if not path:
                raise ValueError("row has neither image bytes nor a path")
            data = Path(path).read_bytes()
        return data, (os.path.basename(path) if path else self.relname(i))


def open_hf(spec: str, section: ShardSection) -> Source:
    """A save_to_disk folder, or `hf:<name>[:<config>]` from the Hub."""
    # `datasets` is imported where used: it takes ~1.5 s, which only a Hugging Face source pays.
    import datasets

    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        try:
            data = datasets.load_dataset(name, config or None)
        except Exception as e:   # offline, unknown name, gated: all end the same way for the user
            raise SourceError(f"could not load Hugging Face dataset '{name}' ({type(e).__name__}: "
                              f"{e}). Check the name and that you are online, or save it with "
                              f"save_to_disk and pass that folder as --source") from None
    else:
        try:
            data = datasets.load_from_disk(spec)
        except Exception as e:
            raise SourceError(f"{spec} looks like a save_to_disk folder but does not load "
                              f"({type(e).__name__}: {e})") from None
    return _from_datasets(spec, data, section)


def open_parquet(spec: str, files: list[str], section: ShardSection) -> Source:
    """Parquet files, assigned to the recipe's splits by file or folder name."""
    import datasets

    root = Path(spec) if Path(spec).is_dir() else None
    data_files = _assign_parquet(spec, files, section.splits, root)
    try:
        data = datasets.load_dataset("parquet", data_files=data_files)
    except Exception as e:
        raise SourceError(f"could not read parquet files {spec} "
                          f"({type(e).__name__}: {e})") from None
    return _from_datasets(spec, data, section)


def _assign_parquet(spec: str, files: list[str], splits: list[str], root) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for split in splits:
        names = (split,) + _ALIASES.get(split, ())
        pat = re.compile(rf"^({'|'.join(map(re.escape, names))})([-_.]|$)")
        mine = []
        for f in files:
            rel = Path(f).relative_to(root) if root else Path(Path(f).name)
            if pat.match(Path(f).stem) or any(part in names for part in rel.parts[:-1]):
                mine.append(f)
        if mine:
            out[split] = mine
    if not out and len(splits) == 1:
        return {splits[0]: files}
    missing = [s for s in splits if s not in out]
    if missing:
        shown = ", ".join(Path(f).name for f in files[:8])
        raise SourceError(f"no parquet files for split(s) {', '.join(missing)} in {spec} (files: "
                          f"{shown}); name them <split>-*.parquet or put them in a <split>/ "
                          f"folder, or set shard.splits")
    return out


def _pick(data, split: str, spec: str):
    import datasets

    if isinstance(data, datasets.Dataset):
        return data, "train"
    for name in (split,) + _ALIASES.get(split, ()):
        if name in data:
            return data[name], name
    raise SourceError(f"split '{split}' is not in {spec}; it has: {', '.join(data)}. Set "
                      f"shard.splits to the splits to shard")


def _from_datasets(spec: str, data, section: ShardSection) -> Source:
    import datasets

    if isinstance(data, datasets.Dataset) and len(section.splits) > 1:
        raise SourceError(f"{spec} is a single dataset without splits; set shard.splits to one "
                          f"name, e.g. shard.splits=[train]")
    picked = {s: _pick(data, s, spec) for s in section.splits}
    class_names, origin = None, ""
    if section.class_list:
        root = Path(spec) if Path(spec).is_dir() else Path(".")
        class_names = read_class_list(resolve_path(section.class_list, root, "class_list"))
        origin = f"shard.class_list {section.class_list}"
    splits = {}
    for split, (ds, where) in picked.items():
        ds = _check_columns(ds, spec, where, section)
        labels, class_names = _labels(ds, section.label_column, class_names, origin,
                                      f"{spec} split '{where}'")
        origin = origin or f"the class names of split '{where}' (give shard.class_list for others)"
        splits[split] = HFSplit(split, ds, section.image_column, labels, where)
    return Source("hf", spec, class_names, splits)


def _check_columns(ds, spec: str, where: str, section: ShardSection):
    import datasets

    for key in ("image_column", "label_column"):
        col = getattr(section, key)
        if col not in ds.column_names:
            raise SourceError(f"{spec} split '{where}' has no column '{col}' (shard.{key}); its "
                              f"columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns([section.image_column, section.label_column])
    feat = ds.features[section.image_column]
    if isinstance(feat, datasets.Image):
        return ds.cast_column(section.image_column, datasets.Image(decode=False))
    if isinstance(feat, datasets.Value) and feat.dtype in ("binary", "large_binary", "string",
                                                            "large_string"):
        return ds
    raise SourceError(f"{spec} split '{where}': column '{section.image_column}' is {feat}, not "
                      f"images; set shard.image_column to the image column")


def _labels(ds, column: str, class_names, origin: str, where: str) -> tuple[np.ndarray, list[str]]:
    """int32 labels and the class names, checked: no nulls, nothing outside the class names.
    With `class_names` given (a class list, or an earlier split's), ClassLabel and string labels
    are mapped to them by name."""
    import datasets

    feat = ds.features[column]
    values = ds.with_format("arrow")[column]
    if values.null_count:
        raise SourceError(f"{where}: column '{column}' has {values.null_count} empty labels")
    if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
        strings = values.to_pylist()
        names = class_names or sorted(set(strings))
        index = {c: i for i, c in enumerate(names)}
        for row, s in enumerate(strings):
            if s not in index:
                raise SourceError(f"{where}: row {row} has label '{s}', not in {origin}")
        return np.fromiter((index[s] for s in strings), np.int32, len(strings)), list(names)
    if not (isinstance(feat, datasets.ClassLabel) or (isinstance(feat, datasets.Value)
                                                      and feat.dtype.startswith(("int", "uint")))):
        raise SourceError(f"{where}: label column '{column}' is {feat}; expected ClassLabel, int "
                          f"or string labels (shard.label_column)")
    labels = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    own = feat.names if isinstance(feat, datasets.ClassLabel) else None
    names = own or class_names or [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if bad.size:
        raise SourceError(f"{where}: row {bad[0]} has label {labels[bad[0]]}, outside the "
                          f"{len(names)} classes ({bad.size} such rows; -1 marks unlabelled "
                          f"rows). Shard only labelled splits or fix shard.class_list")
    if own is None or class_names is None:
        return labels.astype(np.int32), list(names)
    index = {c: i for i, c in enumerate(class_names)}
    lut = np.array([index.get(n, -1) for n in own], np.int64)
    mapped = lut[labels]
    if (mapped < 0).any():
        row = int(np.flatnonzero(mapped < 0)[0])
        raise SourceError(f"{where}: row {row} has label '{own[labels[row]]}', not in {origin}")
    return mapped.astype(np.int32), list(class_names)
