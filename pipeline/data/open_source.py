"""Labelled image sources for the shard stage: every split is (image bytes, label) by sample index.

`open_source(spec, section)` picks the kind from `--source`:

  folder   root/<split>/<class>/<image> (the ImageNet train layout). Class index = sorted class
           folder names of the first split, or the recipe's `shard.class_list`. A split folder that
           holds images directly (ImageNet val as distributed) takes its labels from
           `shard.label_file`: LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt with
           the devkit's meta.mat next to it (pipeline/data/folder_source.py).
  hf       a Hugging Face `datasets` dataset: a save_to_disk folder (auto-detected), parquet files
           (`x.parquet`, a glob, or a folder of them) or `hf:<name>[:<config>]` from the Hub
           (pipeline/data/hf_source.py).
  tars     webdataset tars, e.g. an earlier shard stage's output: re-shard (tar_source.py).

This module only dispatches; the types every kind shares are in pipeline/data/source.py.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from pipeline.data.folder_source import open_folder
from pipeline.data.hf_source import open_hf, open_parquet
from pipeline.data.source import Source, SourceError
from pipeline.data.tar_source import open_tars
from pipeline.recipe import ShardSection


def open_source(spec: str, section: ShardSection, out: str | os.PathLike | None = None) -> Source:
    """Open `spec` (see the module docstring) for the recipe's shard section; checks every split,
    class and label before any image is decoded. `out` is refused if it is the source folder or
    lies inside it: the shards would land in the tree being read."""
    if spec.startswith("hf:"):
        return open_hf(spec, section)
    if _has_magic(spec):
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
    _check_out(path, out)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return open_hf(spec, section)
    if (path / "_info.json").is_file() or any(path.glob("*.tar")):
        return open_tars(spec, sorted(str(p) for p in path.glob("*.tar")), section)
    # Only two levels deep (x.parquet, data/x.parquet, train/x.parquet): an image-folder tree
    # with a million files must not be walked here; deeper layouts can be passed as a glob.
    parquet = sorted(str(p) for pat in ("*.parquet", "*/*.parquet") for p in path.glob(pat))
    if parquet:
        return open_parquet(spec, parquet, section)
    return open_folder(spec, section)


def _open_files(spec: str, files: list[str], section: ShardSection, out) -> Source:
    """Parquet or tar files given one by one or as a glob."""
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts not in ({".parquet"}, {".tar"}):
        raise SourceError(f"source {spec}: expected .parquet or .tar files, got "
                          f"{', '.join(sorted(exts))}")
    # Shards written next to the files would mix with them (a re-shard would overwrite its input
    # tars); a recursive glob would also pick them up from anywhere below its root.
    for folder in sorted({Path(f).parent for f in files}):
        _check_out(folder, out, nested=False)
    if "**" in spec:
        _check_out(_glob_root(spec), out)
    if exts == {".parquet"}:
        return open_parquet(spec, files, section)
    return open_tars(spec, files, section)


def _has_magic(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _glob_root(pattern: str) -> Path:
    """The folder a glob searches from: its leading components without wildcards."""
    parts = Path(pattern).parts
    fixed = next((i for i, p in enumerate(parts) if _has_magic(p)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")


def _check_out(source_dir: Path, out, nested: bool = True) -> None:
    """Refuse `out` equal to the source folder (or, with `nested`, anywhere inside it): the shards
    would overwrite or mix with the input, and an image or tar folder would read them back."""
    if out is None:
        return
    src, dst = source_dir.resolve(), Path(out).resolve()
    if dst == src or (nested and dst.is_relative_to(src)):
        where = "is" if dst == src else "is inside"
        raise SourceError(f"--out {out} {where} the source folder {source_dir}; shards written "
                          f"there would overwrite the input or be read back as input. Write the "
                          f"shards outside the source tree, e.g. --out "
                          f"{src.parent / (src.name + '-shards')}")
