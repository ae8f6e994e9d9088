"""Files that are never half-written: the one home for atomic writes and content hashes.

Every output of the pipeline (recipes, manifests, metrics, checkpoints, model folders, published
folders) goes through `atomic_write_text` or `atomic_dir`:

- a file is written under a temporary name in the same folder, flushed and fsync'ed, then renamed
  over the target (`os.replace` is atomic on POSIX), and the folder entry is fsync'ed;
- a folder is built in a temporary sibling folder (every file fsync'ed), then swapped in: the old
  folder is first renamed aside, the new one renamed into place, and only then is the old one
  deleted. A crash at any moment leaves either the old folder or the new one under the target
  name (or, between the two renames, the old one under `<name>.old-*`, which the next write of
  the same folder puts back before it starts).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(d)
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _aside_name(target: Path) -> str:
    return f".{target.name}.old-"


def restore_interrupted_swap(target: str | os.PathLike) -> None:
    """If a swap of `target` was interrupted between its two renames (the old folder renamed
    aside, the new one not yet in place), put the old folder back."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return
    prefix = _aside_name(target)
    aside = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    if aside:
        os.replace(aside[-1], target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder that replaces `target` as a whole, or not at all.

        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(...)

    The body writes into `tmp` (a new sibling of `target`, mode 0777 & ~umask). On success every
    file is fsync'ed, the old `target` (if any) is renamed aside, `tmp` renamed to `target`, and the
    old folder deleted: write, swap, then delete. On an exception `tmp` is removed and `target` is
    left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())             # mkdtemp makes 0700: a normal folder's mode
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_aside_name(target), dir=target.parent))
        os.replace(target, old)                       # aside (replaces the empty placeholder)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
