"""JPEG decoding at reduced scale (PIL's ``draft``) against a full decode, and what it changes.

    python benchmarks/decode_draft.py [--images 100] [--side 2048]

Kermany's files are 224 px, so large JPEGs are made from them in memory (upscaled to ``side``,
quality 92, as a CheXpert or MIMIC-CXR-JPG file would be). For each working size it prints the
time per image of a full decode + bilinear resize and of medxfer's decode (``load_image``, which
drafts to ``DRAFT_FACTOR`` x the size), the speed-up, and the pixel difference (mean, 99th
percentile and largest absolute difference in gray levels).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medxfer.data.images import DRAFT_FACTOR, load_image

KERMANY = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


def full_decode(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))


def timed(fn, paths, size) -> tuple[float, list[np.ndarray]]:
    started = time.perf_counter()
    out = [fn(p, size) for p in paths]
    return (time.perf_counter() - started) / len(paths), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--side", type=int, default=2048)
    args = parser.parse_args()
    sources = sorted(KERMANY.glob("train/*/*.jpeg"))[::40][: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, source in enumerate(sources):
            big = Image.open(source).convert("L").resize((args.side, args.side), Image.BICUBIC)
            paths.append(Path(tmp) / f"{i}.jpeg")
            big.save(paths[-1], "JPEG", quality=92)
        print(f"{len(paths)} JPEGs of {args.side} px, DRAFT_FACTOR {DRAFT_FACTOR}")
        for size in (224, 512):
            full_s, full = timed(full_decode, paths, size)
            ours_s, ours = timed(load_image, paths, size)
            diff = np.concatenate(
                [
                    np.abs(a.astype(int) - b.astype(int)).ravel()
                    for a, b in zip(full, ours, strict=True)
                ]
            )
            print(
                f"{size} px: full {full_s * 1e3:.1f} ms, medxfer {ours_s * 1e3:.1f} ms per image "
                f"({full_s / ours_s:.2f}x); |difference| mean {diff.mean():.2f}, "
                f"p99 {np.percentile(diff, 99):.0f}, max {diff.max()} gray levels"
            )


if __name__ == "__main__":
    main()
