"""Speed-up of ``--workers N`` (Ray Train, gloo on CPUs) over one worker and over one process.

    python benchmarks/workers.py [--workers 1,2] [--per-class 200] [--image-size 128]

Two runs, each in a fresh cache, on the first ``--per-class`` training images of each class of
Kermany (and 30 val, 50 test): a frozen MobileNet v2 transfer run (where the time is the
feature extraction, shared out between the workers) and two epochs of ResNet-18 from scratch
(DistributedDataParallel). Each is timed as one process (``--workers 0``, torch's threads on
every core) and with each N in ``--workers``; the table gives wall seconds (Ray's start-up
included) and the ratio of N workers to 1 worker and to one process, measured in this run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_floor import KERMANY, load

RUNS = {
    "transfer": ["--mode", "transfer", "--views", "1", "--epochs", "5"],
    "scratch": ["--arch", "resnet18", "--mode", "scratch", "--epochs", "2", "--augment", "none"],
}


def subset(root: Path, per_class: int) -> Path:
    sizes = {"train": per_class, "val": 30, "test": 50}
    for split, n in sizes.items():
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((KERMANY / split / cls).glob("*.jpeg"))[:n]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def timed(data: Path, work: Path, run: str, workers: int, size: int) -> float:
    out, cache = work / f"{run}-{workers}", work / f"cache-{run}-{workers}"
    command = [sys.executable, "-m", "medxfer.cli", "train", "--data", str(data), "--out"]
    command += [str(out), "--quiet", "--image-size", str(size), "--bootstrap", "0"]
    command += ["--cache-dir", str(cache), *RUNS[run]]
    if workers:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="medxfer-workers-") as tmp:
        work = Path(tmp)
        data = subset(work / "data", args.per_class)
        print("| run | workers | wall s | / 1 worker | / one process |")
        print("|---|---|---|---|---|")
        for run in RUNS:
            single = timed(data, work, run, 0, args.image_size)
            print(f"| {run} | one process | {single:.0f} | | 1.00 |", flush=True)
            base = None
            for n in counts:
                seconds = timed(data, work, run, n, args.image_size)
                base = base or seconds
                print(
                    f"| {run} | {n} | {seconds:.0f} | {seconds / base:.2f} "
                    f"| {seconds / single:.2f} |",
                    flush=True,
                )
        print(f"[{load()}]")


if __name__ == "__main__":
    main()
