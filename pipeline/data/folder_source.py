"""Image folders as a shard-stage source: root/<split>/<class>/<image> (the ImageNet train layout).

Class index = sorted class folder names of the first split, or the recipe's `shard.class_list`.
A split folder that holds images directly (ImageNet val as distributed) takes its labels from
`shard.label_file`: LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt with the
devkit's meta.mat next to it. Non-image files are counted and passed over, never read.
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.source import (
    NameTable,
    Source,
    SourceError,
    SourceSplit,
    is_image_name,
    read_class_list,
    resolve_path,
)
from pipeline.recipe import ShardSection


@dataclass
class FolderSplit:
    """One split folder: image paths relative to it, and their labels."""
    name: str
    root: Path                  # the split folder
    names: NameTable            # paths relative to `root`
    labels: np.ndarray
    ignored: int = 0
    fingerprint: str = ""       # contents are named by path; the plan hashes every path

    def __len__(self) -> int:
        return len(self.names)

    def relname(self, i: int) -> str:
        return f"{self.name}/{self.names[i]}"

    def read(self, i: int) -> tuple[bytes, str]:
        return (self.root / self.names[i]).read_bytes(), self.relname(i)


class _Ignored:
    """Non-image files: counted, a few kept as examples (there may be millions, e.g. .xml boxes)."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, name: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(name)


def _walk_images(folder: Path, prefix: str, ignored: _Ignored) -> Iterator[str]:
    """Image paths under `folder` (relative, '/'-joined, sorted); other files go to `ignored`."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        rel = f"{prefix}{e.name}"
        if e.is_dir():
            if not e.name.startswith("."):      # .ipynb_checkpoints and the like hold copies
                yield from _walk_images(Path(e.path), rel + "/", ignored)
        elif is_image_name(e.name):
            yield rel
        else:
            ignored.add(rel)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def open_folder(spec: str, section: ShardSection) -> Source:
    """An image-folder tree `spec/<split>/<class>/<image>`, flat split folders via label_file."""
    root = Path(spec)
    split_dirs = {s: root / s for s in section.splits}
    layouts = _layouts(root, split_dirs, section)
    label_maps = {s: _flat_labels(root, split_dirs[s], section) for s, lay in layouts.items()
                  if lay == "flat"}
    class_names, origin = _class_names(root, split_dirs, layouts, label_maps, section)
    index = {c: i for i, c in enumerate(class_names)}
    splits: dict[str, SourceSplit] = {}
    examples: list[str] = []
    for split, d in split_dirs.items():
        ignored = _Ignored()
        if layouts[split] == "classes":
            names, labels = _scan_class_folders(d, index, origin, ignored)
        else:
            names, labels = _scan_flat(d, label_maps[split], index, origin, section, ignored)
        splits[split] = FolderSplit(split, d, names, np.frombuffer(labels, np.int32).copy(),
                                    ignored=ignored.count)
        examples += [f"{split}/{n}" for n in ignored.examples]
    return Source("folder", spec, class_names, splits, examples[:10])


def _layouts(root: Path, split_dirs: dict[str, Path], section: ShardSection) -> dict[str, str]:
    """Each split folder's layout: "classes" (class folders) or "flat" (images directly)."""
    for d in split_dirs.values():
        if not d.is_dir():
            have = _class_dirs(root)
            raise SourceError(f"split folder {d} not found (shard.splits={section.splits}); {root} "
                              f"holds: {', '.join(have[:10]) or 'no folders'}. Set shard.splits "
                              f"to the split folders to shard, e.g. "
                              f"shard.splits=[{have[0] if have else 'train'}]")
    layouts = {s: ("classes" if _class_dirs(d) else "flat") for s, d in split_dirs.items()}
    for split, d in split_dirs.items():
        if layouts[split] == "flat" and not any(is_image_name(e.name) for e in os.scandir(d)):
            raise SourceError(f"split folder {d} has no class folders and no images; expected "
                              f"{d}/<class>/<image> (or images directly, with shard.label_file)")
    return layouts


def _class_names(root: Path, split_dirs: dict[str, Path], layouts: dict[str, str],
                 label_maps: dict[str, dict[str, str]], section: ShardSection
                 ) -> tuple[list[str], str]:
    """(class names, where they came from): class list, else class folders, else the labels."""
    if section.class_list:
        names = read_class_list(resolve_path(section.class_list, root, "class_list"))
        return names, f"the class list {section.class_list}"
    if any(lay == "classes" for lay in layouts.values()):
        first = next(s for s, lay in layouts.items() if lay == "classes")
        return _class_dirs(split_dirs[first]), f"the class folders of {split_dirs[first]}"
    names = sorted({c for m in label_maps.values() for c in m.values()})
    return names, f"the labels in {section.label_file}"


def _scan_class_folders(split_dir: Path, index: dict[str, int], origin: str,
                        ignored: _Ignored) -> tuple[NameTable, array]:
    names, labels = NameTable(), array("i")
    for cls in _class_dirs(split_dir):
        if cls not in index:
            raise SourceError(f"class folder {split_dir / cls} is not in {origin} "
                              f"({len(index)} classes); add it there (shard.class_list) or remove "
                              f"the folder")
        before, n_ignored = len(names), ignored.count
        for rel in _walk_images(split_dir / cls, cls + "/", ignored):
            names.append(rel)
            labels.append(index[cls])
        if len(names) == before:
            other = ignored.count - n_ignored
            raise SourceError(f"class folder {split_dir / cls} has no images ({other} non-image "
                              f"files ignored); add images or remove the folder")
    # Files lying next to the class folders are not labelled by any folder: ignored and counted.
    for e in os.scandir(split_dir):
        if e.is_file():
            ignored.add(e.name)
    return names, labels


def _scan_flat(split_dir: Path, label_map: dict[str, str], index: dict[str, int], origin: str,
               section: ShardSection, ignored: _Ignored) -> tuple[NameTable, array]:
    names, labels = NameTable(), array("i")
    for rel in _walk_images(split_dir, "", ignored):
        stem = os.path.splitext(os.path.basename(rel))[0]
        if stem not in label_map:
            raise SourceError(f"{split_dir / rel} has no label in {section.label_file}; give the "
                              f"label file that matches this folder or remove the image")
        cls = label_map[stem]
        if cls not in index:
            raise SourceError(f"label '{cls}' of {split_dir / rel} (from {section.label_file}) is "
                              f"not in {origin} ({len(index)} classes); fix the label file or the "
                              f"class list")
        names.append(rel)
        labels.append(index[cls])
    if not len(names):
        raise SourceError(f"split folder {split_dir} has no images and no class folders")
    return names, labels


def _flat_labels(root: Path, split_dir: Path, section: ShardSection) -> dict[str, str]:
    if not section.label_file:
        raise SourceError(f"{split_dir} holds images directly, without class folders; set "
                          f"shard.label_file to its labels (LOC_val_solution.csv, or "
                          f"ILSVRC2012_validation_ground_truth.txt with meta.mat next to it)")
    return read_label_file(resolve_path(section.label_file, root, "label_file"))


def read_label_file(path: Path) -> dict[str, str]:
    """Image stem -> class name (wnid) from ImageNet's label files.

    LOC_val_solution.csv (Kaggle): `ImageId,PredictionString` rows whose first token is the wnid.
    ILSVRC2012_validation_ground_truth.txt (devkit): line i holds the ILSVRC2012_ID of
    ILSVRC2012_val_{i:08d}; IDs are not the sorted-wnid order, so meta.mat maps them to wnids.
    """
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and lines[0].replace(" ", "").lower() == "imageid,predictionstring":
        out = {}
        for n, ln in enumerate(lines[1:], 2):
            image_id, _, pred = ln.partition(",")
            if not pred.split():
                raise SourceError(f"{path}:{n}: no class in '{ln}'")
            out[image_id.strip()] = pred.split()[0]
        return out
    if lines and all(ln.isdigit() for ln in lines):
        wnids = _devkit_wnids(path)
        try:
            return {f"ILSVRC2012_val_{i:08d}": wnids[int(v)] for i, v in enumerate(lines, 1)}
        except KeyError as e:
            raise SourceError(f"{path}: ILSVRC2012_ID {e} is not in meta.mat") from None
    raise SourceError(f"label file {path}: unknown format; expected LOC_val_solution.csv "
                      f"(ImageId,PredictionString) or ILSVRC2012_validation_ground_truth.txt")


def _devkit_wnids(gt_path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1,000 leaf synsets in the devkit's meta.mat."""
    places = (gt_path.parent / "meta.mat", gt_path.parent.parent / "data" / "meta.mat")
    meta = next((p for p in places if p.is_file()), None)
    if meta is None:
        raise SourceError(f"{gt_path} lists ILSVRC2012_IDs; put the devkit's meta.mat next to it "
                          f"to map them to wnids (or use LOC_val_solution.csv)")
    from scipy.io import loadmat  # only the devkit's label file needs scipy: load it then

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
