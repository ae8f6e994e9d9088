"""The bundled demo data: scikit-learn's handwritten digits as RGB JPEG image folders.

scikit-learn ships the 1,797 8x8 digit images (UCI optical digits) inside the package, so the demo
needs no download. They are upscaled to `size` px and written in the ImageNet folder layout:

    <out>/pretrain/{train,val}/<digit>/<index>.jpg     digits 0-4: the pretraining label space
    <out>/finetune/{train,val}/<digit>/<index>.jpg     digits 5-9: a different label space

so pretraining and fine-tuning see disjoint classes, and `val` is held out (a seeded, stratified
20% of each class).

    python -m pipeline.data.demo data/demo/raw
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
FINETUNE_DIGITS = (5, 6, 7, 8, 9)


def write_digits(out: str | Path, size: int = 64, val_fraction: float = 0.2, seed: int = 0,
                 quality: int = 95) -> dict[str, int]:
    """Write the digits as JPEG folders under `out` (replaced atomically). Returns file counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target        # (1797, 8, 8) in 0..16, (1797,)
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts: dict[str, int] = {}
    try:
        for part, digit_set in (("pretrain", PRETRAIN_DIGITS), ("finetune", FINETUNE_DIGITS)):
            for digit in digit_set:
                idx = np.flatnonzero(labels == digit)
                idx = idx[rng.permutation(len(idx))]
                n_val = int(round(len(idx) * val_fraction))
                for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
                    folder = tmp / part / split / str(digit)
                    folder.mkdir(parents=True, exist_ok=True)
                    for i in sorted(chosen):
                        pixels = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
                        img.convert("RGB").save(folder / f"{i:04d}.jpg", quality=quality)
                    key = f"{part}/{split}"
                    counts[key] = counts.get(key, 0) + len(chosen)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (replaced)")
    ap.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts = write_digits(args.out, size=args.size, seed=args.seed)
    for key, n in counts.items():
        print(f"{key}: {n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
