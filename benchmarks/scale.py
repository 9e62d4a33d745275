"""A frozen MobileNet v2 transfer run on synthetic collections of N distinct 1024 px PNGs.

    python benchmarks/scale.py --sizes 10000,30000,100000 [--work DIR] [--keep]

For each N it writes N PNGs derived from Kermany's images (each a differently shifted crop,
resized to 1024 x 1024, so every file has its own bytes; labels and train/test split from the
source image), runs ``medxfer train --mode transfer --image-size 224 --views 1 --engine
onnxruntime`` on them in a fresh cache as a child process, and prints per N: decode img/s,
feature img/s, head training time, the child's peak RSS, wall time, and the ratio of wall time
to the floor measured in the same run: bare PIL decode + resize of the same files on every core,
plus the bare onnxruntime forward of the same count of views (both measured on an even sample
above 20,000 files / 10,000 views, and scaled). The collection is removed
afterwards (unless ``--keep``); a size the disk cannot hold is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import KERMANY, floor, load

SIDE = 1024


def sources() -> list[tuple[Path, str, str]]:
    """(file, split, class) of every Kermany image, val folded into train, in a fixed shuffled
    order so that any first N holds every split and class."""
    out = []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for path in sorted((KERMANY / split / cls).glob("*.jpeg")):
                out.append((path, "test" if split == "test" else "train", cls))
    return [out[i] for i in np.random.default_rng(0).permutation(len(out))]


def write_collection(root: Path, n: int) -> int:
    """N distinct 1024 px PNGs under root/SPLIT/CLASS/; returns their total bytes."""
    files = sources()

    def one(i: int) -> int:
        path, split, cls = files[i % len(files)]
        shift = 1 + i // len(files)  # another crop of the same source: other bytes
        with Image.open(path) as img:
            gray = img.convert("L")
        w, h = gray.size
        crop = gray.crop((shift, shift, w - shift, h - shift)).resize((SIDE, SIDE))
        target = root / split / cls / f"{i:06d}.png"
        crop.save(target, compress_level=1)
        return target.stat().st_size

    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return sum(pool.map(one, range(n)))


# Above these counts the floor's throughput is measured on an even sample of the files (and
# of the views) and scaled to the whole count: both are per-image rates, and measuring every
# file of a 100,000-image collection twice more would take longer than the run itself.
DECODE_SAMPLE = 20_000
FORWARD_SAMPLE = 10_000


def bare_decode(root: Path, size: int) -> tuple[float, int]:
    """Seconds to decode and resize every PNG under ``root`` with PIL on every core (from an
    even sample of ``DECODE_SAMPLE`` files above that count), and the count of files."""
    every = sorted(root.glob("*/*/*.png"))
    files = every[:: -(-len(every) // DECODE_SAMPLE)] if len(every) > DECODE_SAMPLE else every

    def one(path: Path) -> None:
        with Image.open(path) as img:
            np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))

    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, files))
    return (time.perf_counter() - started) * len(every) / len(files), len(every)


def medxfer_run(data: Path, work: Path) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (bytes) and metrics.json of one transfer run in a fresh cache."""
    cache, out = work / "cache", work / "run"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "medxfer.cli", "train", "--data", str(data)]
    command += ["--out", str(out), "--quiet", "--mode", "transfer", "--image-size", "224"]
    command += ["--views", "1", "--engine", "onnxruntime", "--bootstrap", "0"]
    started = time.perf_counter()
    child = subprocess.Popen(
        command, env={**os.environ, "MEDXFER_CACHE": str(cache)}, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"medxfer train failed on {data} (status {status})")
    shutil.rmtree(cache, ignore_errors=True)
    return seconds, usage.ru_maxrss * 1024, json.loads((out / "metrics.json").read_text())


def measure(n: int, work: Path, keep: bool) -> dict | None:
    data = work / f"png{n}"
    need = n * 0.5e6  # PNGs of about 0.35 MB here, and room for the cache
    if shutil.disk_usage(work).free < need:
        print(f"N={n}: skipped, the disk has {shutil.disk_usage(work).free / 1e9:.0f} GB free")
        return None
    shutil.rmtree(data, ignore_errors=True)
    try:
        started = time.perf_counter()
        size = write_collection(data, n)
        print(f"N={n}: wrote {size / 1e9:.1f} GB of PNGs in {time.perf_counter() - started:.0f} s")
        wall, rss, metrics = medxfer_run(data, work)
        decode_floor, count = bare_decode(data, 224)
    finally:
        if not keep:
            shutil.rmtree(data, ignore_errors=True)
    seconds, sizes = metrics["seconds"], metrics["split_sizes"]
    views = sizes["train"] + sizes.get("val", 0) + sizes["test"]
    sample = min(views, FORWARD_SAMPLE)
    forward_floor = floor(sample, 224, 64) * views / sample
    row = {
        "N": count,
        "decode img/s": count / seconds["data"],
        "features img/s": views / seconds["features"],
        "head s": seconds["epochs"],
        "peak RSS GB": rss / 1e9,
        "wall s": wall,
        "floor s": decode_floor + forward_floor,
        "ratio": wall / (decode_floor + forward_floor),
        "test accuracy": metrics["test"]["accuracy"],
    }
    print(json.dumps(row) + f" [{load()}]")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medxfer-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the PNGs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [measure(int(n), args.work, args.keep) for n in args.sizes.split(",")]
    print("| N | decode img/s | features img/s | head s | peak RSS GB | wall s | floor s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in filter(None, rows):
        print(
            f"| {r['N']:,} | {r['decode img/s']:.0f} | {r['features img/s']:.0f} "
            f"| {r['head s']:.1f} | {r['peak RSS GB']:.2f} | {r['wall s']:.0f} "
            f"| {r['floor s']:.0f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
