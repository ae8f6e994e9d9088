r"""Shard a labelled image dataset into deterministic, verified webdataset tars.

    python stages/shard.py --recipe recipes/f0.yaml --source /data/imagenet \
        --out /data/shards/imagenet --verify                      # full scale: ImageNet-1k, all cores
    python stages/shard.py --recipe recipes/demo.yaml --source data/demo/raw/pretrain \
        --out data/shards/pretrain --workers 2                    # tiny, CPU, a few seconds
    python stages/shard.py --verify --out data/shards/pretrain    # only check existing shards

--source is one of:
  <folder>                 image folders <folder>/<split>/<class>/<image> (ImageNet's layout; a flat
                           val/ takes its labels from shard.label_file), or a datasets save_to_disk
                           folder (auto-detected), or a folder of *.parquet or of webdataset *.tar
  <file.parquet>, '<glob>' parquet files (split from the file names) or tars (re-shard)
  hf:<name>[:<config>]     a Hugging Face Hub dataset (online only)

Writes <out>/<split>-NNNNNN.tar, <out>/_info.json (the manifest, timm-compatible, written last),
<out>/_skipped.json (unreadable inputs and why), <out>/_progress.jsonl (what a re-run reuses) and
<out>/recipe.resolved.yaml. Re-running after a kill reuses every finished shard whose sha256 matches.
Dotted overrides follow the options, e.g. `shard.shard_size=512 shard.max_size=256`.
Exit codes: 0 ok, 1 shards failed (too many unreadable images) or --verify found problems,
2 bad recipe, source or arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pipeline.data.manifest import ManifestError  # noqa: E402
from pipeline.data.sources import SourceError, open_source  # noqa: E402
from pipeline.data.writer import (ShardError, check_section, default_workers, verify,  # noqa: E402
                                  write_shards)
from pipeline.recipe import RecipeError, load_recipe, write_resolved  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stages/shard.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, help="recipe YAML (its shard: section is used)")
    ap.add_argument("--source", help="images to shard (see above)")
    ap.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes (default: shard.workers, 0 = all cores)")
    ap.add_argument("--verify", action="store_true",
                    help="check every shard against the manifest afterwards (alone: only check)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="recipe overrides, e.g. shard.shard_size=512")
    return ap


def _err(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.source is None:
        if not args.verify:
            return _err("give --source to shard (or --verify alone to check --out)", 2)
        return _verify(args.out)
    if args.recipe is None:
        return _err("--recipe is required with --source", 2)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_section(recipe.shard)
    except (RecipeError, ShardError) as e:
        return _err(str(e), 2)
    section = recipe.shard
    workers = args.workers if args.workers is not None else section.workers
    if workers < 0:
        return _err(f"--workers {workers}: give a number of processes, or 0 for all cores", 2)
    workers = workers or default_workers()

    t0 = time.perf_counter()
    try:
        source = open_source(args.source, section, out=args.out)
    except SourceError as e:
        return _err(str(e), 2)
    sizes = ", ".join(f"{s}: {len(v)}" for s, v in source.splits.items())
    print(f"source {args.source} ({source.kind}): {len(source.class_names)} classes; {sizes} "
          f"images; listed in {time.perf_counter() - t0:.1f}s")
    if source.ignored:
        shown = ", ".join(source.ignored_examples[:5])
        print(f"ignored {source.ignored} non-image files (e.g. {shown})")

    write_resolved(recipe, "shard", args.out, overrides=args.overrides, resolved={
        "workers": workers, "source": args.source, "source_kind": source.kind,
        "num_classes": len(source.class_names),
        "source_samples": {s: len(v) for s, v in source.splits.items()}})
    try:
        stats = write_shards(source, args.out, section, workers=workers, progress=not args.quiet)
    except ShardError as e:
        return _err(str(e), 1)
    for split, st in stats.items():
        rate = f"{st.images_per_s:.0f} img/s with {workers} workers" if st.processed else "all reused"
        print(f"{split}: {st.samples} samples in {st.shards} shards ({st.reused} reused), "
              f"{st.skipped} skipped, {st.seconds:.1f}s, {rate}")
    print(f"wrote {args.out / '_info.json'}")
    return _verify(args.out) if args.verify else 0


def _verify(out: Path) -> int:
    try:
        problems = verify(out)
    except ManifestError as e:
        return _err(str(e), 1)
    for p in problems:
        print(f"verify: {p}", file=sys.stderr)
    if problems:
        return _err(f"{len(problems)} problems in {out}; re-run the shard stage to rewrite the "
                    f"damaged shards", 1)
    print(f"verify: every shard in {out} matches its manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
