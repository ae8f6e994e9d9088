"""Write a source's splits as deterministic, restartable webdataset tars, then the manifest.

    <out>/<split>-NNNNNN.tar   samples `<index>.cls`, `<index>.jpg`, `<index>.json`
    <out>/_progress.jsonl      one line per finished shard (what a re-run may reuse)
    <out>/_skipped.json        every unreadable input with its reason
    <out>/_info.json           the manifest (pipeline/data/manifest.py), written last

Samples are spread over shards by a seeded permutation; shard sizes differ by at most one (a shard
loses the samples that were skipped in it, and says so in the skip report). The key of a sample is
its index in the source, so two files with one name never collide and keys carry no dots.

Byte-identical output: members in a fixed order with a fixed mtime, owner and mode; the json is
sorted; the encoder is deterministic for a given Pillow/libjpeg build (part of each shard's plan).

Restart: a shard is written under a temporary name and renamed when complete, then logged in
`_progress.jsonl` with its plan hash (which samples, their labels, the image settings) and sha256.
A re-run reuses a shard whose plan is unchanged, that skipped nothing and whose file still hashes
to the logged sha256; everything else is rewritten.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import ImageFile, features
from tqdm import tqdm
from webdataset import TarWriter

from pipeline.data.images import encode_image
from pipeline.data.manifest import manifest_path, write_manifest
from pipeline.data.source import Source
from pipeline.files import WriteError, atomic_write_text, explain_write, human_bytes, sha256_file
from pipeline.recipe import ShardSection, to_dict

KEYS = {"image": "jpg", "label": "cls", "meta": "json"}
JOURNAL = "_progress.jsonl"
SKIP_REPORT = "_skipped.json"
TAR_MTIME = 0                   # fixed: TarWriter stamps the current time otherwise


class ShardError(RuntimeError):
    """The shards cannot be written as asked; the message names the cause and the fix."""


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# The plan: which samples go to which shard
# --------------------------------------------------------------------------------------------

@dataclass
class ShardPlan:
    split: str
    shard: int
    indices: np.ndarray         # source sample indices, in the order they are written
    plan_sha256: str = ""

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.shard:06d}.tar"


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijection on uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def permutation(n: int, seed: int, split: str) -> np.ndarray:
    """The order samples are written in: sorted by a 64-bit hash of (seed, split, index).

    Not numpy's Generator.permutation, whose algorithm may change between NumPy versions; this
    is the same on every version and machine (the hash is a bijection, so there are no ties).
    The split name joins the seed so train and val are not permuted alike.
    """
    key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 ^ zlib.crc32(split.encode())) % 2**64],
                          dtype=np.uint64))
    with np.errstate(over="ignore"):
        return np.argsort(_mix64(np.arange(n, dtype=np.uint64) + key), kind="stable")


def plan_split(source: Source, split: str, section: ShardSection) -> list[ShardPlan]:
    """Seeded permutation cut into equal shards (sizes differ by at most one)."""
    src = source.splits[split]
    n = len(src)
    perm = permutation(n, section.seed, split)
    num_shards = max(1, -(-n // section.shard_size))
    bounds = np.linspace(0, n, num_shards + 1).round().astype(np.int64)
    # The encoder build is part of the plan: another libjpeg may encode other bytes.
    libjpeg = features.version("libjpeg_turbo") or features.version_codec("jpg")
    header = json.dumps({"format": 1, "split": split, "max_size": section.max_size,
                         "jpeg_quality": section.jpeg_quality, "fingerprint": src.fingerprint,
                         "pillow": PIL.__version__, "libjpeg": libjpeg}, sort_keys=True)
    plans = []
    for k in range(num_shards):
        idx = perm[bounds[k]:bounds[k + 1]]
        h = hashlib.sha256(header.encode())
        for i in idx.tolist():
            label = int(src.labels[i])
            h.update(f"{i}\t{src.relname(i)}\t{label}\t{source.class_names[label]}\n".encode(
                "utf-8", "surrogateescape"))
        plans.append(ShardPlan(split, k, idx, h.hexdigest()))
    return plans


# --------------------------------------------------------------------------------------------
# Workers: one task writes one shard
# --------------------------------------------------------------------------------------------

@dataclass
class _State:
    source: Source
    out: Path
    max_size: int | None
    jpeg_quality: int
    progress: Callable[[int], None] = field(default=lambda n: None)


_STATE: _State | None = None


def _init_worker(source: Source, out: Path, max_size, quality, counter=None, progress=None) -> None:
    global _STATE
    if counter is not None:
        def progress(n: int, counter=counter) -> None:
            with counter.get_lock():
                counter.value += n
    _STATE = _State(source, out, max_size, quality, progress or (lambda n: None))


def _run_shard(task: tuple[ShardPlan, dict | None]) -> dict:
    plan, previous = task
    st = _STATE
    path = st.out / plan.filename
    if previous is not None and path.is_file() and sha256_file(path) == previous["sha256"]:
        st.progress(len(plan.indices))
        return {**previous, "reused": True}
    src = st.source.splits[plan.split]
    tmp = st.out / f".{plan.filename}.tmp"
    skipped, count = [], 0
    # Some libraries switch this on process-wide; it would pad truncated images with grey.
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with _explained(plan, path, tmp, lambda: count), open(tmp, "wb") as f:
            # webdataset's writer, with mtime/owner/mode fixed for byte-identical tars.
            with TarWriter(f, user="nfnet", group="nfnet", mode=0o444, encoder=False,
                           mtime=TAR_MTIME) as tw:
                for i in plan.indices.tolist():
                    sample = _encode_sample(src, i, st, skipped)
                    if sample is not None:
                        tw.write(sample)
                        count += 1
                    st.progress(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    return {"split": plan.split, "shard": plan.shard, "file": plan.filename,
            "plan": plan.plan_sha256, "sha256": sha256_file(path), "count": count,
            "skipped": skipped}


def _explained(plan: ShardPlan, path: Path, tmp: Path, count: Callable[[], int]):
    """io.explain_write for one shard: on a full disk, its size is estimated from the samples
    written so far."""
    def written() -> int | None:
        return tmp.stat().st_size if tmp.exists() else None

    def estimate() -> int | None:
        n, size = count(), written()
        return size * len(plan.indices) // n if n and size else None
    return explain_write(path, f"shard {plan.filename} ({len(plan.indices)} samples)",
                         written=written, estimate=estimate)


def _encode_sample(src, i: int, st: _State, skipped: list) -> dict | None:
    try:
        raw, original = src.read(i)
        jpg = encode_image(raw, st.max_size, st.jpeg_quality)
    except MemoryError:
        raise
    except Exception as e:      # decoders raise many types for bad bytes; all mean "unreadable"
        skipped.append({"file": src.relname(i), "reason": f"{type(e).__name__}: {e}"})
        return None
    label = int(src.labels[i])
    meta = {"file": original, "label": st.source.class_names[label], "cls": label, "index": i}
    return {"__key__": f"{i:09d}", "jpg": jpg, "cls": str(label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------

@dataclass
class SplitStats:
    samples: int = 0            # in the shards, reused ones included
    shards: int = 0
    reused: int = 0             # shards kept from an earlier run
    processed: int = 0          # images decoded this run (written or skipped)
    skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0


def write_shards(source: Source, out: str | os.PathLike, section: ShardSection, workers: int = 0,
                 progress: bool = True) -> dict[str, SplitStats]:
    """Shard every split of `source` into `out`; the manifest is written last, and only when every
    split stayed within shard.max_skipped_fraction (else ShardError, with the skip report written)."""
    empty = [s for s in section.splits if not len(source.splits[s])]
    if empty:
        raise ShardError(f"split(s) {', '.join(empty)} of {source.location} hold no samples; "
                         f"remove them from shard.splits")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path(out).unlink(missing_ok=True)     # its absence marks the output incomplete
    for stale in out.glob(".*.tar.tmp"):            # left by a killed run
        stale.unlink()
    workers = workers or section.workers or default_workers()
    previous = _read_journal(out)
    records: dict[str, list[dict]] = {}
    stats: dict[str, SplitStats] = {}
    for split in section.splits:
        plans = plan_split(source, split, section)
        t0 = time.perf_counter()
        records[split] = _write_split(source, out, split, plans, previous, section, workers,
                                      progress, records)
        st = stats[split] = SplitStats(shards=len(plans), seconds=time.perf_counter() - t0)
        for r in records[split]:
            st.samples += r["count"]
            st.skipped += len(r["skipped"])
            st.reused += bool(r.get("reused"))
            st.processed += 0 if r.get("reused") else r["count"] + len(r["skipped"])
    _write_journal(out, [r for rs in records.values() for r in rs])
    report = _write_skip_report(out, source, records)
    _remove_stale_tars(out, records)
    write_manifest(out, _manifest(source, section, records, report))
    return stats


def _write_split(source, out, split, plans, previous, section, workers, progress, records) -> list:
    n = len(source.splits[split])
    # a fraction alone fails a 300-image folder on its first bad file; a floor of a few files
    # keeps small sets usable and changes nothing at ImageNet scale
    allowed = max(section.max_skipped_fraction * n, section.max_skipped_files)
    done: list[dict] = []
    tasks = [(p, _reusable(previous.get(p.filename), p)) for p in plans]

    def on_result(rec: dict) -> None:
        if not rec.get("reused"):
            _append_journal(out, rec)
        done.append(rec)
        skipped = sum(len(r["skipped"]) for r in done)
        if skipped > allowed:       # known to fail: stop now, not after the whole split
            report = _write_skip_report(out, source, {**records, split: done})
            raise ShardError(
                f"split '{split}': {skipped} of {n} images could not be read (at least "
                f"{skipped / n:.3%}), more than shard.max_skipped_fraction="
                f"{section.max_skipped_fraction} and shard.max_skipped_files="
                f"{section.max_skipped_files} allow. Each is listed with its reason in "
                f"{report}. Repair or remove those files and re-run (finished shards are "
                f"reused), or raise shard.max_skipped_fraction or shard.max_skipped_files.")

    state = (source, out, section.max_size, section.jpeg_quality)
    bar = tqdm(total=n, unit="img", desc=f"shard {split}", disable=not progress, smoothing=0.05)
    try:
        if workers <= 1 or len(tasks) <= 1:
            _init_worker(*state, progress=bar.update)
            for t in tasks:
                on_result(_run_shard(t))
        else:
            _run_pool(tasks, min(workers, len(tasks)), state, bar, on_result)
    except WriteError as e:
        raise WriteError(f"{e}. {_still_needed(out, plans, done)}") from None
    finally:
        bar.close()
        _init_worker(None, out, None, 0)        # drop the in-process reference to the source
    return sorted(done, key=lambda r: r["shard"])


def _still_needed(out: Path, plans: list[ShardPlan], done: list[dict]) -> str:
    """What the split's unwritten shards need, at the written shards' bytes per sample."""
    written = [r for r in done if (out / r["file"]).is_file()]
    samples = sum(r["count"] for r in written)
    if not samples:
        return "Finished shards are kept and reused when the stage runs again"
    per_sample = sum((out / r["file"]).stat().st_size for r in written) / samples
    left = sum(len(p.indices) for p in plans) - sum(r["count"] + len(r["skipped"]) for r in done)
    return (f"The split's {len(plans) - len(done)} unwritten shards need about "
            f"{human_bytes(per_sample * left)} more ({human_bytes(per_sample)} a sample so far); "
            f"finished shards are kept and reused when the stage runs again")


def _run_pool(tasks, workers: int, state: tuple, bar, on_result) -> None:
    # fork shares the source's arrays with the workers instead of pickling them to each one.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, _init_worker, (*state, counter)) as pool:
        results = pool.imap_unordered(_run_shard, tasks)
        for _ in range(len(tasks)):
            while True:
                try:
                    rec = results.next(timeout=0.25)
                    break
                except mp.TimeoutError:
                    bar.update(counter.value - bar.n)
            bar.update(counter.value - bar.n)
            on_result(rec)


def _reusable(rec: dict | None, plan: ShardPlan) -> dict | None:
    """The journal record if it describes exactly this plan, complete (nothing skipped)."""
    if rec and rec.get("plan") == plan.plan_sha256 and not rec.get("skipped") \
            and rec.get("count") == len(plan.indices):
        return rec
    return None


def _read_journal(out: Path) -> dict[str, dict]:
    path = out / JOURNAL
    recs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                recs[rec["file"]] = rec      # later lines win
            except (ValueError, KeyError, TypeError):
                continue                     # a line torn by a kill
    return recs


def _append_journal(out: Path, rec: dict) -> None:
    with explain_write(out / JOURNAL, "the shard journal"), open(out / JOURNAL, "a") as f:
        f.write(json.dumps({k: v for k, v in rec.items() if k != "reused"}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_journal(out: Path, recs: list[dict]) -> None:
    atomic_write_text(out / JOURNAL, "".join(
        json.dumps({k: v for k, v in r.items() if k != "reused"}) + "\n" for r in recs))


def _write_skip_report(out: Path, source: Source, records: dict[str, list[dict]]) -> Path:
    splits = {}
    for split, recs in records.items():
        files = sorted(({**s, "shard": r["file"]} for r in recs for s in r["skipped"]),
                       key=lambda s: s["file"])
        splits[split] = {"skipped": len(files), "total": len(source.splits[split]), "files": files}
    path = out / SKIP_REPORT
    atomic_write_text(path, json.dumps({"source": source.location, "splits": splits}, indent=1) + "\n")
    return path


def _remove_stale_tars(out: Path, records: dict[str, list[dict]]) -> None:
    """Shards of these splits left from an earlier plan with more shards (a smaller shard_size)."""
    for split, recs in records.items():
        keep = {r["file"] for r in recs}
        for p in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if p.name not in keep:
                p.unlink()


def _manifest(source: Source, section: ShardSection, records: dict[str, list[dict]], report: Path) -> dict:
    recipe = {k: v for k, v in to_dict(section).items() if k != "workers"}   # no effect on bytes
    splits = {}
    for split, recs in records.items():
        splits[split] = {
            "name": split,
            "num_samples": sum(r["count"] for r in recs),
            "filenames": [r["file"] for r in recs],
            "shard_lengths": [r["count"] for r in recs],
            "sha256": [r["sha256"] for r in recs],
            "sizes": [(report.parent / r["file"]).stat().st_size for r in recs],   # bytes
            "plan_sha256": [r["plan"] for r in recs],
            "skipped": sum(len(r["skipped"]) for r in recs),
            "ignored_files": source.splits[split].ignored,
        }
    return {"num_classes": len(source.class_names), "class_names": list(source.class_names),
            "keys": dict(KEYS), "recipe": recipe,
            "source": {"kind": source.kind, "location": source.location},
            "skip_report": report.name, "splits": splits}
