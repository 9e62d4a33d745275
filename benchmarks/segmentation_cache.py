"""Frozen-encoder segmentation: what caching the encoder's outputs buys, in one process.

Two `medxfer segment train` runs of frozen MobileNet v2 on lung_seg, identical but for
`--feature-cache` (the encoder outputs of the clean validation and test images computed once
and decoded every epoch) and `--no-feature-cache` (every evaluation runs the encoder again).
Training images are augmented afresh every epoch, so their encoder pass (without autograd) is
paid either way. Prints per-epoch seconds, the ratios cached / uncached per epoch and for the
whole run, the cache's bytes, and that both runs select the same epoch with the same test Dice.

    python benchmarks/segmentation_cache.py --data ../shared/data/lung_seg --epochs 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from medxfer.segmentation.options import SegmentationOptions
from medxfer.segmentation.run import train_segmentation


def run(data: str, out: Path, cache: bool, args: argparse.Namespace) -> dict:
    options = SegmentationOptions(
        data=data,
        out=str(out),
        image_size=args.image_size,
        epochs=args.epochs,
        feature_cache=cache,
        bootstrap=0,
        device="cpu",
    )
    train_segmentation(options, log=lambda _: None)
    metrics = json.loads((out / "metrics.json").read_text())
    history = pd.read_csv(out / "history.csv")
    return {"metrics": metrics, "epoch_seconds": history.seconds.to_numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/lung_seg")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cached = run(args.data, Path(tmp) / "cached", True, args)
        plain = run(args.data, Path(tmp) / "plain", False, args)
    c, p = cached["metrics"], plain["metrics"]
    per_c, per_p = cached["epoch_seconds"].mean(), plain["epoch_seconds"].mean()
    print(f"epochs {args.epochs} at {args.image_size} px, lung_seg {c['split_sizes']}")
    print(f"uncached: {per_p:.1f} s per epoch (train + encoder and decoder on val and test)")
    print(
        f"cached:   {per_c:.1f} s per epoch, plus {c['feature_cache']['seconds']:.1f} s once "
        f"to encode val+test ({c['feature_cache']['bytes'] / 1e6:.0f} MB in memory)"
    )
    print(f"ratio cached / uncached per epoch: {per_c / per_p:.2f}")
    total_c, total_p = c["seconds"]["total"], p["seconds"]["total"]
    print(f"ratio cached / uncached, whole run: {total_c / total_p:.2f}")
    same = c["selected_epoch"] == p["selected_epoch"]
    print(
        f"same selected epoch: {same}; test Dice cached {c['test']['dice']:.4f}, "
        f"uncached {p['test']['dice']:.4f}"
    )


if __name__ == "__main__":
    main()
