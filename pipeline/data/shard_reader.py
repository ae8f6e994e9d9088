"""Reading the samples of shards in a given order, each shard checked against its manifest.

`PositionReader` reads raw samples by position in an epoch's shard order (pipeline/data/reader.py
decides the order); a local shard's size is checked when it is opened and its sha256 when it has
been read through, and a sample that cannot be read comes back as a marker for the loader to count
and replace. webdataset reads the tars (`open_shard`).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import webdataset as wds

from pipeline.data.manifest import SplitInfo, is_local


class DataError(RuntimeError):
    """Training data that cannot be used; the message names the shard, the sample and the fix."""


def open_shard(url: str, stream=None) -> Iterator[dict[str, Any]]:
    """Samples of one tar (local path, `pipe:` command or URL) as dicts of raw bytes; `stream`
    reads the bytes instead of opening `url` (a hashing reader)."""
    src = [dict(url=url, stream=stream)] if stream is not None else \
        wds.tariterators.url_opener([dict(url=url)])
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(src))


class HashingReader:
    """A file wrapper that hashes what is read (one pass gives samples and sha256)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):      # tarfile may stop before the end-of-archive padding
            pass
        return self.h.hexdigest()


def fix_hint(url: str) -> str:
    folder = os.path.dirname(url) if is_local(url) else "<shards>"
    return (f"check the shards with `python stages/shard.py --verify --out {folder}` and re-run "
            f"the shard stage for the damaged ones")


class PositionReader:
    """Reads raw samples by position in one epoch's shard order, sequentially.

    Consecutive reads continue the open tar; a jump reopens the shard and skips to the offset.
    A local shard is checked against the manifest when it is opened (its size) and when it has
    been read from its first byte to its last (its sha256, hashed on the fly: ~1% of a worker's
    time, measured in benchmarks/RESULTS.md); a changed shard stops training with DataError.
    Samples that cannot be read (a truncated or damaged tar) come back as markers
    {"__key__", "__url__", "__error__"} for the loader to count and replace. With `strict` off
    (loader.bad_samples: skip) a shard that differs from the manifest is read as far as it goes,
    and the finding rides on one of its samples ("__note__") to be said once.
    """

    def __init__(self, split: SplitInfo, order: np.ndarray, strict: bool = True):
        self.strict = strict
        self._note: str | None = None
        self.urls = [split.urls[i] for i in order]
        self.sha = [split.sha256[i] if split.sha256 else None for i in order]
        self.sizes = [split.sizes[i] if split.sizes else None for i in order]
        self.starts = np.concatenate([[0], np.cumsum([split.shard_lengths[i] for i in order])])
        self._it: Iterator[dict] | None = None
        self._hash: HashingReader | None = None
        self._broken: str | None = None          # why the open shard cannot be read further
        self._next = -1
        self._shard = -1

    def read(self, p0: int, p1: int) -> list[dict[str, Any]]:
        out = []
        if p0 != self._next:
            self._seek(p0)
        while self._next < p1:
            if self._next >= self.starts[self._shard + 1]:
                self._open(self._shard + 1)
            out.append(self._sample())
            self._next += 1
            if self._next == self.starts[self._shard + 1]:
                self._verify()
            if self._note is not None:
                out[-1] = {**out[-1], "__note__": self._note}
                self._note = None
        return out

    def _mismatch(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        self._note = message

    def _sample(self) -> dict[str, Any]:
        url = self.urls[self._shard]
        if self._broken is None:
            try:
                return next(self._it)
            except StopIteration:
                expected = int(self.starts[self._shard + 1] - self.starts[self._shard])
                got = self._next - int(self.starts[self._shard])
                self._broken = (f"the tar ends after {got} samples; the manifest says {expected} "
                                f"(truncated?)")
            except Exception as e:          # tarfile / webdataset raise several types
                self._broken = f"the tar cannot be read ({type(e).__name__}: {e})"
            self._hash = None
        position = self._next - int(self.starts[self._shard])
        return {"__key__": f"{os.path.basename(url)}#{position}", "__url__": url,
                "__error__": self._broken}

    def _open(self, shard: int, whole: bool = True) -> None:
        self._shard, self._broken, self._hash = shard, None, None
        url = self.urls[shard]
        if not is_local(url):
            self._it = open_shard(url)
            return
        size, expected = os.path.getsize(url), self.sizes[shard]
        if expected is not None and size != expected:
            self._mismatch(f"shard {url} is {size:,} bytes; the manifest says {expected:,}: it "
                           f"changed after sharding; {fix_hint(url)}")
        f = open(url, "rb")
        if whole and self.sha[shard]:
            self._hash = HashingReader(f)
            self._it = open_shard(url, self._hash)
        else:
            self._it = open_shard(url, f)

    def _verify(self) -> None:
        """At the end of a shard read from its first byte: its sha256 against the manifest."""
        if self._hash is None:
            return
        digest, expected, url = self._hash.finish(), self.sha[self._shard], self.urls[self._shard]
        self._hash = None
        if digest != expected:
            self._mismatch(f"shard {url} does not match the manifest (sha256 {digest[:16]}... "
                           f"instead of {expected[:16]}...): it changed after sharding; "
                           f"{fix_hint(url)}")

    def _seek(self, p: int) -> None:
        shard = int(np.searchsorted(self.starts, p, side="right") - 1)
        skip = p - int(self.starts[shard])
        self._open(shard, whole=skip == 0)
        self._next = int(self.starts[shard])
        for _ in range(skip):                  # skip within the shard (reads, does not decode)
            self._sample()
            self._next += 1
