"""MobileNet v2 transfer run: a plain tutorial-style loop versus medxfer, in one process.

(a) plain: torchvision ImageFolder + PIL transforms (the paper's augmentation) + DataLoader
    (2 workers), ImageNet MobileNet v2 with its features frozen and in eval mode, a new
    Linear(1280, 1) head, BCE with pos_weight, Adam 1e-3, batch 64; every epoch decodes every
    JPEG and runs the full forward pass; test metrics after the last epoch.
(b) medxfer: `medxfer train` with the same protocol (all of train, last epoch, no validation
    carve-out), from a cold cache; then again warm.

The plain loop costs the same every epoch, so `--plain-epochs N` (< epochs) times N epochs and
extrapolates its wall time linearly; its accuracy is then compared with medxfer trained for the
same N epochs (labelled as such in the output).

    python benchmarks/transfer_vs_plain.py --data ../shared/data/chest_xray --plain-epochs 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from medxfer.classification.run import train
from medxfer.config import RunConfig


def plain_loop(data: Path, epochs: int, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    norm = T.Normalize([0.5] * 3, [0.5] * 3)
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.7, 1.0)),
            T.ColorJitter(0.2, 0.2),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10),
            T.Grayscale(3),
            T.ToTensor(),
            norm,
        ]
    )
    test_tf = T.Compose([T.Resize((224, 224)), T.Grayscale(3), T.ToTensor(), norm])
    train_set = torchvision.datasets.ImageFolder(data / "train", train_tf)
    test_set = torchvision.datasets.ImageFolder(data / "test", test_tf)
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=2)
    test_loader = DataLoader(test_set, batch_size=batch, num_workers=2)

    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    for p in model.parameters():
        p.requires_grad = False
    model.classifier[1] = nn.Linear(1280, 1)
    targets = np.array(train_set.targets)
    pos_weight = torch.tensor((targets == 0).sum() / (targets == 1).sum())
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)

    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        model.features.eval()  # frozen backbone: a linear probe, as medxfer's default
        for x, y in train_loader:
            loss = criterion(model(x).squeeze(1), y.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    train_seconds = time.perf_counter() - started
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for x, y in test_loader:
            probs.append(torch.sigmoid(model(x).squeeze(1)))
            labels.append(y)
    prob, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return {
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "accuracy": accuracy_score(y, prob >= 0.5),
        "roc_auc": roc_auc_score(y, prob),
    }


def medxfer_run(data: Path, epochs: int, batch: int, seed: int, cache: Path, out: Path) -> dict:
    cfg = RunConfig(
        data=str(data),
        out=str(out),
        epochs=epochs,
        batch_size=batch,
        seed=seed,
        val_fraction=0.0,
        select="last",
        bootstrap=0,
        cache_dir=str(cache),
    )
    started = time.perf_counter()
    train(cfg, progress=False, log=lambda _: None)
    seconds = time.perf_counter() - started
    test = json.loads((out / "metrics.json").read_text())["test"]
    return {"seconds": seconds, "accuracy": test["accuracy"], "roc_auc": test["roc_auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--plain-epochs",
        type=int,
        default=None,
        help="epochs actually run by the plain loop (default: --epochs)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    plain_epochs = args.plain_epochs or args.epochs
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; mobilenet_v2 transfer, "
        f"{args.epochs} epochs, batch {args.batch_size}"
    )
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cold = medxfer_run(
                args.data, args.epochs, args.batch_size, seed, tmp / "cache", tmp / "cold"
            )
            warm = medxfer_run(
                args.data, args.epochs, args.batch_size, seed, tmp / "cache", tmp / "warm"
            )
            same = (
                medxfer_run(
                    args.data, plain_epochs, args.batch_size, seed, tmp / "cache", tmp / "same"
                )
                if plain_epochs != args.epochs
                else cold
            )
        plain = plain_loop(args.data, plain_epochs, args.batch_size, seed)
        plain_full = plain["seconds"] + plain["train_seconds"] * (args.epochs / plain_epochs - 1)
        label = "" if plain_epochs == args.epochs else f" (extrapolated from {plain_epochs})"
        print(f"seed {seed}")
        print(f"  plain loop   {args.epochs} epochs: {plain_full:8.1f} s{label}")
        print(
            f"  medxfer cold {args.epochs} epochs: {cold['seconds']:8.1f} s   "
            f"speed-up {plain_full / cold['seconds']:.1f}x"
        )
        print(
            f"  medxfer warm {args.epochs} epochs: {warm['seconds']:8.1f} s   "
            f"speed-up {plain_full / warm['seconds']:.1f}x"
        )
        print(
            f"  test after {plain_epochs} epochs: plain accuracy {plain['accuracy']:.4f} "
            f"AUC {plain['roc_auc']:.4f} | medxfer accuracy {same['accuracy']:.4f} "
            f"AUC {same['roc_auc']:.4f}"
        )
        if plain_epochs != args.epochs:
            print(
                f"  medxfer after {args.epochs} epochs: accuracy {cold['accuracy']:.4f} "
                f"AUC {cold['roc_auc']:.4f}"
            )


if __name__ == "__main__":
    main()
