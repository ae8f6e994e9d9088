r"""Shard a labelled image dataset into deterministic, verified webdataset tars.

    python stages/shard.py --recipe recipes/f0.yaml --source /data/imagenet \
        --out /data/shards/imagenet --verify                    # full scale: ImageNet-1k, all cores
    python stages/shard.py --recipe recipes/demo.yaml --source data/demo/raw/pretrain \
        --out data/shards/pretrain --workers 2                  # tiny, CPU, a few seconds
    python stages/shard.py --verify --out data/shards/pretrain    # only check existing shards

--source is one of:
  <folder>                 image folders <folder>/<split>/<class>/<image> (ImageNet's layout; a flat
                           val/ takes its labels from shard.label_file), or a datasets save_to_disk
                           folder (auto-detected), or a folder of *.parquet or of webdataset *.tar
  <file.parquet>, '<glob>' parquet files (split from the file names) or tars (re-shard)
  hf:<name>[:<config>]     a Hugging Face Hub dataset (online only)

Writes <out>/<split>-NNNNNN.tar, <out>/_info.json (the manifest, timm-compatible, written last),
<out>/_skipped.json (unreadable inputs and why), <out>/_progress.jsonl (what a re-run reuses) and
<out>/recipe.resolved.yaml. Re-running after a kill reuses every finished shard whose sha256
matches. --out must lie outside the source tree. Dotted overrides may go before or after the
options, e.g. `shard.shard_size=512 shard.max_size=256`.
Exit codes: 0 ok, 1 shards failed (too many unreadable images) or --verify found problems,
2 bad recipe, source or arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.cli import fail, load_recipe_or_exit, stage_parser
from pipeline.data.manifest import ManifestError
from pipeline.data.open_source import open_source
from pipeline.data.source import Source, SourceError
from pipeline.data.verify import verify
from pipeline.data.writer import ShardError, SplitStats, default_workers, write_shards
from pipeline.files import WriteError
from pipeline.recipe import ShardSection, write_resolved


def _parser() -> argparse.ArgumentParser:
    ap = stage_parser(__doc__, recipe_required=False)
    ap.add_argument("--source", help="images to shard (see above); needs --recipe")
    ap.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes (default: shard.workers, 0 = all cores)")
    ap.add_argument("--verify", action="store_true",
                    help="check every shard against the manifest afterwards (alone: only check)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    # Intermixed: options may follow the dotted overrides, as in the other stages.
    args = _parser().parse_intermixed_args(argv)
    if args.source is None:
        if not args.verify:
            fail("give --source to shard (or --verify alone to check --out)")
        return _verify(args.out)
    if args.recipe is None:
        fail("--recipe is required with --source")
    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    section = recipe.shard
    workers = args.workers if args.workers is not None else section.workers
    if workers < 0:
        fail(f"--workers {workers}: give a number of processes, or 0 for all cores")
    workers = workers or default_workers()

    source = _open(args.source, section, args.out)
    try:
        write_resolved(recipe, "shard", args.out, overrides=args.overrides, resolved={
            "workers": workers, "source": args.source, "source_kind": source.kind,
            "num_classes": len(source.class_names),
            "source_samples": {s: len(v) for s, v in source.splits.items()}})
        stats = write_shards(source, args.out, section, workers=workers, progress=not args.quiet)
    except (ShardError, WriteError) as e:  # WriteError: disk full, read-only (one line)
        fail(str(e), 1)
    _print_stats(stats, workers)
    print(f"wrote {args.out / '_info.json'}")
    return _verify(args.out) if args.verify else 0


def _open(spec: str, section: ShardSection, out: Path) -> Source:
    """The source, listed and checked (exit 2 on a bad one); prints what was found."""
    t0 = time.perf_counter()
    try:
        source = open_source(spec, section, out=out)
    except SourceError as e:
        fail(str(e))
    sizes = ", ".join(f"{s}: {len(v)}" for s, v in source.splits.items())
    print(f"source {spec} ({source.kind}): {len(source.class_names)} classes; {sizes} "
          f"images; listed in {time.perf_counter() - t0:.1f}s")
    if source.ignored:
        shown = ", ".join(source.ignored_examples[:5])
        print(f"ignored {source.ignored} non-image files (e.g. {shown})")
    return source


def _print_stats(stats: dict[str, SplitStats], workers: int) -> None:
    for split, st in stats.items():
        rate = (f"{st.images_per_s:.0f} img/s with {workers} workers" if st.processed
                else "all reused")
        print(f"{split}: {st.samples} samples in {st.shards} shards ({st.reused} reused), "
              f"{st.skipped} skipped, {st.seconds:.1f}s, {rate}")


def _verify(out: Path) -> int:
    """Check every shard in `out` against its manifest: 0 when all match, else exit 1."""
    try:
        problems = verify(out)
    except ManifestError as e:
        fail(str(e), 1)
    for p in problems:
        print(f"verify: {p}", file=sys.stderr)
    if problems:
        fail(f"{len(problems)} problems in {out}; re-run the shard stage to rewrite the damaged "
             f"shards", 1)
    print(f"verify: every shard in {out} matches its manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
