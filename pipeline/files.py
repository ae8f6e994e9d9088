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

A write that fails for want of space, quota or permission (disk full, a read-only folder) raises
`WriteError`: one line naming the path, what was being written, the space it needs and the space
free there. With a known size (`needs`) the check comes first, before a byte is written.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# errors a user fixes by freeing space or writing elsewhere (the rest keep their traceback)
_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for the filesystem", errno.EROFS: "read-only filesystem",
            errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


class WriteError(Exception):
    """A write that failed for want of space or permission; the message is the one line to show."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space for this user on the filesystem of `path` (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _errno_of(e: BaseException | None) -> int | None:
    """The OS error number behind `e`: an OSError's, one that it was raised while handling
    (torch.save writing to a Python file), or one quoted in its message (safetensors writes
    through Rust: "... Os { code: 28, kind: StorageFull ...")."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"(?:os error|code:) ?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def write_failure(target: str | os.PathLike, what: str, e: BaseException,
                  needs: int | None = None, written: int | None = None) -> WriteError | None:
    """The WriteError for `e` raised while writing `what` to `target`, or None when `e` is not
    a want of space or permission."""
    code = _errno_of(e)
    if code not in _NO_ROOM:
        return None
    free = free_bytes(target)
    if free is not None and written:
        free += written                  # the partial write is removed before the message shows
    size = (f"it needs {human_bytes(needs)}" if needs is not None else
            f"{human_bytes(written)} were written before it failed" if written else
            "its size is not known in advance")
    where = f"{human_bytes(free)} free there" if free is not None else "free space unknown"
    fix = ("make it writable or write elsewhere" if code in (errno.EROFS, errno.EACCES, errno.EPERM)
           else "free space there or write elsewhere")
    return WriteError(f"could not write {what} to {target}: {_NO_ROOM[code]} "
                      f"({errno.errorcode.get(code, code)}); {size}, {where}. Nothing "
                      f"half-written was left; {fix}, then run the same command again")


def check_room(target: str | os.PathLike, what: str, needs: int | None) -> None:
    """Raise WriteError before writing `needs` bytes where fewer are free."""
    free = free_bytes(target)
    if needs is not None and free is not None and needs > free:
        raise write_failure(target, what, OSError(errno.ENOSPC, "no space"), needs)


@contextlib.contextmanager
def explain_write(target: str | os.PathLike, what: str, needs: int | None = None,
                  written: Callable[[], int | None] = lambda: None,
                  estimate: Callable[[], int | None] = lambda: None) -> Iterator[None]:
    """Turn a want of space or permission inside the block into WriteError. Where `needs` is
    not known in advance, `estimate` gives it at the failure (from what was written), else
    `written` the bytes written so far."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        failure = write_failure(target, what, e, needs if needs is not None else estimate(),
                                written())
        if failure is None:
            raise
        raise failure from e


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, fsync, rename
    (`what`: the name WriteError gives it; the file name by default)."""
    path = Path(path)
    with explain_write(path, what or path.name, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())    # mkstemp makes 0600; give it a normal file's mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, what: str | None = None) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), what)


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
def atomic_dir(target: str | os.PathLike, what: str | None = None,
               needs: int | None = None) -> Iterator[Path]:
    """Build a folder that replaces `target` as a whole, or not at all.

        with atomic_dir(out, what="the model folder", needs=nbytes) as tmp:
            (tmp / "model.safetensors").write_bytes(...)

    The body writes into `tmp` (a new sibling of `target`, mode 0777 & ~umask). On success every
    file is fsync'ed, the old `target` (if any) is renamed aside, `tmp` renamed to `target`, and the
    old folder deleted: write, swap, then delete. On an exception `tmp` is removed and `target` is
    left as it was; a want of space or permission becomes WriteError naming `what` (the folder's
    name by default) and `needs` (bytes, checked before anything is written when given).
    """
    target = Path(target)
    what = what or target.name
    with explain_write(target, what, needs):
        check_room(target, what, needs)
        target.parent.mkdir(parents=True, exist_ok=True)
        restore_interrupted_swap(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with explain_write(target, what, needs, lambda: _tree_size(tmp)):
            os.chmod(tmp, 0o777 & ~_umask())         # mkdtemp makes 0700: a normal folder's mode
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


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
