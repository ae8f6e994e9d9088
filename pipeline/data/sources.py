"""Labelled image sources for the shard stage: every split is (image bytes, label) by sample index.

`open_source(spec, section)` picks the kind from `--source`:

  folder   root/<split>/<class>/<image> (the ImageNet train layout). Class index = sorted class
           folder names of the first split, or the recipe's `shard.class_list`. A split folder that
           holds images directly (ImageNet val as distributed) takes its labels from
           `shard.label_file`: LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt with
           the devkit's meta.mat next to it.
  hf       a Hugging Face `datasets` dataset: a save_to_disk folder (auto-detected), parquet files
           (`x.parquet`, a glob, or a folder of them) or `hf:<name>[:<config>]` from the Hub
           (pipeline/data/hf_source.py).
  tars     webdataset tars, e.g. an earlier shard stage's output: re-shard (tar_source.py).

The writer permutes samples across shards, so every split is random-access by index. It is also
compact: at ImageNet-21k scale (13 M images) the per-sample state is flat arrays (names in one bytes
blob, labels in int32), which forked workers share without copying; nothing is decoded up front.
"""
from __future__ import annotations

import glob
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol

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


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

def open_source(spec: str, section, out: Optional[str | os.PathLike] = None) -> Source:
    """Open `spec` (see the module docstring) for the recipe's shard section; checks every split,
    class and label before any image is decoded. `out` is refused if it would overwrite the input."""
    from pipeline.data import hf_source, tar_source

    if spec.startswith("hf:"):
        return hf_source.open_hf(spec, section)
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise SourceError(f"source pattern {spec} matches no files")
        return _open_files(spec, files, section, out)
    path = Path(spec)
    if not path.exists():
        parent = path.parent if path.parent.is_dir() else None
        near = ", ".join(sorted(p.name for p in parent.iterdir())[:10]) if parent else ""
        hint = f" ({parent} holds: {near})" if near else ""
        raise SourceError(f"source path not found: {spec}{hint}. Pass an image-folder root, a "
                          f"save_to_disk folder, parquet files, tars or hf:<name>")
    if path.is_file():
        return _open_files(spec, [str(path)], section, out)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return hf_source.open_hf(spec, section)
    if (path / "_info.json").is_file() or any(path.glob("*.tar")):
        _check_out(path, out)
        return tar_source.open_tars(spec, sorted(str(p) for p in path.glob("*.tar")), section)
    # Only two levels deep (x.parquet, data/x.parquet, train/x.parquet): an image-folder tree
    # with a million files must not be walked here; deeper layouts can be passed as a glob.
    parquet = sorted(str(p) for pat in ("*.parquet", "*/*.parquet") for p in path.glob(pat))
    if parquet:
        return hf_source.open_parquet(spec, parquet, section)
    return open_folder(spec, section)


def _open_files(spec: str, files: list[str], section, out) -> Source:
    from pipeline.data import hf_source, tar_source

    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts == {".parquet"}:
        return hf_source.open_parquet(spec, files, section)
    if exts == {".tar"}:
        for f in files:
            _check_out(Path(f).parent, out)
        return tar_source.open_tars(spec, files, section)
    raise SourceError(f"source {spec}: expected .parquet or .tar files, got {', '.join(sorted(exts))}")


def _check_out(source_dir: Path, out) -> None:
    if out is not None and Path(out).resolve() == source_dir.resolve():
        raise SourceError(f"--out {out} is the source folder; re-sharding in place would overwrite "
                          f"the tars being read. Write to a new folder")


# --------------------------------------------------------------------------------------------
# Image folders (and ImageNet's flat val folder)
# --------------------------------------------------------------------------------------------

@dataclass
class FolderSplit:
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
        self.count, self.examples = 0, []

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
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def open_folder(spec: str, section) -> Source:
    """An image-folder tree `spec/<split>/<class>/<image>`, flat split folders via label_file."""
    root = Path(spec)
    split_dirs = {s: root / s for s in section.splits}
    for split, d in split_dirs.items():
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
    label_maps = {s: _flat_labels(root, split_dirs[s], section) for s, lay in layouts.items()
                  if lay == "flat"}
    if section.class_list:
        class_names = read_class_list(resolve_path(section.class_list, root, "class_list"))
        origin = f"the class list {section.class_list}"
    elif any(lay == "classes" for lay in layouts.values()):
        first = next(s for s, lay in layouts.items() if lay == "classes")
        class_names = _class_dirs(split_dirs[first])
        origin = f"the class folders of {split_dirs[first]}"
    else:
        class_names = sorted({c for m in label_maps.values() for c in m.values()})
        origin = f"the labels in {section.label_file}"
    index = {c: i for i, c in enumerate(class_names)}
    splits, examples = {}, []
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
               section, ignored: _Ignored) -> tuple[NameTable, array]:
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


def _flat_labels(root: Path, split_dir: Path, section) -> dict[str, str]:
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
    meta = next((p for p in (gt_path.parent / "meta.mat", gt_path.parent.parent / "data" / "meta.mat")
                 if p.is_file()), None)
    if meta is None:
        raise SourceError(f"{gt_path} lists ILSVRC2012_IDs; put the devkit's meta.mat next to it "
                          f"to map them to wnids (or use LOC_val_solution.csv)")
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
