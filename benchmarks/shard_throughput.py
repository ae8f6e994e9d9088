"""Shard-stage throughput: images/s per core on ImageNet-like JPEGs, and scaling with workers.

    python benchmarks/shard_throughput.py                      # 800 images, 1 and 2 workers
    python benchmarks/shard_throughput.py --images 4000 --workers 1 2 4 8 16

Generates textured JPEGs of about 400x350 px and ~110 KB (ImageNet-1k train's averages) in a temp
dir, shards them with the real stage code (folder source -> tars, shorter side resized to 320,
quality 90), and prints img/s, img/s per worker and the speed-up over one worker. Also times the
image work alone (decode + resize + encode, no tar, no processes) and, for large photos
(2560x1920 -> 320), JPEG draft decoding (DCT-domain downscale) against a full decode.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.images import encode_image, target_size, to_rgb  # noqa: E402
from pipeline.data.open_source import open_source  # noqa: E402
from pipeline.data.writer import write_shards  # noqa: E402
from pipeline.recipe import ShardSection  # noqa: E402


def textured(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour blobs plus fine grain: JPEG sizes like real photos (not flat, not pure noise)."""
    low = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float64)
    img += rng.normal(0, 21, (h, w, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_image(root: Path, i: int, classes: int, rng: np.random.Generator) -> int:
    """Image `i` (~400 x 350 px, ~110 KB) as root/train/c<class>/<i>.JPEG; its size in bytes."""
    w, h = int(rng.integers(370, 431)), int(rng.integers(320, 381))
    d = root / "train" / f"c{i % classes:02d}"
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    textured(rng, w, h).save(buf, "JPEG", quality=95)
    (d / f"{i:06d}.JPEG").write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_images(root: Path, n: int, classes: int = 10, seed: int = 0) -> tuple[int, float]:
    rng = np.random.default_rng(seed)
    total = sum(write_image(root, i, classes, rng) for i in range(n))
    return n, total / n / 1000


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # - idle, iowait
    except (OSError, ValueError):
        machine = float("nan")
    ours = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for a in ("ru_utime", "ru_stime"))
    return machine, ours


def shard_rate(root: Path, out: Path, workers: int, shard_size: int) -> tuple[float, float, float]:
    """img/s (wall clock), img per CPU-second of ours (what one core does, whatever else runs),
    and the cores other processes kept busy meanwhile (~0 for a fair wall-clock figure)."""
    section = ShardSection(shard_size=shard_size, max_size=320, jpeg_quality=90, seed=0,
                           splits=["train"], workers=workers)
    source = open_source(str(root), section)
    m0, o0 = _cpu_seconds()
    t0 = time.perf_counter()
    stats = write_shards(source, out, section, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    m1, o1 = _cpu_seconds()
    n = stats["train"].processed
    return n / wall, n / (o1 - o0), max(0.0, (m1 - m0) - (o1 - o0)) / wall


def image_only_rate(files: list[Path]) -> float:
    raws = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    for raw in raws:
        encode_image(raw, 320, 90)
    return len(raws) / (time.perf_counter() - t0)


def draft_comparison(n: int = 40) -> tuple[float, float]:
    """img/s for 2560x1920 JPEGs -> 320 px: with draft (encode_image) and with a full decode.
    (draft only pays at >= 4x the target size: it keeps a 2x margin above the target.)"""
    rng = np.random.default_rng(1)
    raws = []
    for _ in range(n):
        buf = io.BytesIO()
        textured(rng, 2560, 1920).save(buf, "JPEG", quality=90)
        raws.append(buf.getvalue())

    def full_decode(raw: bytes) -> bytes:
        img = to_rgb(Image.open(io.BytesIO(raw)))
        img = img.resize(target_size(img.size, 320), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=90)
        return out.getvalue()

    rates = []
    for fn in (lambda r: encode_image(r, 320, 90), full_decode):
        t0 = time.perf_counter()
        for raw in raws:
            fn(raw)
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", type=int, default=100)
    args = ap.parse_args(argv)
    import PIL
    import webdataset

    print(f"python {platform.python_version()}, Pillow {PIL.__version__}, webdataset "
          f"{webdataset.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        root = Path(tmp) / "raw"
        n, kb = make_images(root, args.images)
        print(f"{n} JPEGs, ~400x350 px, mean {kb:.0f} KB -> shorter side 320, quality 90")
        files = sorted(root.rglob("*.JPEG"))
        print(f"image work only (decode+resize+encode, 1 process): "
              f"{image_only_rate(files[:200]):.0f} img/s")
        base = None
        for w in args.workers:
            rate, per_cpu_s, others = shard_rate(root, Path(tmp) / f"out{w}", w, args.shard_size)
            base = base or rate
            print(f"workers={w}: {rate:.0f} img/s, {rate / w:.0f} img/s per worker, speed-up "
                  f"{rate / base:.2f}x; {per_cpu_s:.0f} img per CPU-second; other processes "
                  f"used {others:.2f} cores meanwhile")
    fast, slow = draft_comparison()
    print(f"2560x1920 -> 320: {fast:.0f} img/s with draft decoding, {slow:.0f} img/s with a full "
          f"decode ({fast / slow:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
