"""Training images per second of medxfer's from-scratch loop versus a bare training step.

medxfer's path: decoded uint8 images in memory -> per-image paper augmentation on the batch ->
gray-to-RGB + normalisation -> forward, class-weighted BCE, backward, Adam step (`fit`, one epoch,
no evaluation). Baseline, in the same process: the same model (channels-last) on random float
tensors already in memory, forward + backward + Adam step at the same batch size.

    python benchmarks/scratch_step.py --arch resnet18 --size 128 --images 256
    python benchmarks/scratch_step.py --arch all --size 224 --images 128   # the paper's eight

Each line carries the 1-minute load average: numbers taken on a busy machine are re-measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from medxfer.data.augment import get_augmentation
from medxfer.models.factory import PAPER_ARCHS, ModelSpec, create_model
from medxfer.runtime import tune_allocator
from medxfer.tasks import make_task
from medxfer.training import loop
from medxfer.training.loop import ImageSource, Schedule, TrainState, build_optimizer, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="an architecture, or all")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"allocator: {tune_allocator()}")  # as the medxfer command does
    for arch in PAPER_ARCHS if args.arch == "all" else [args.arch]:
        measure(arch, args)


def measure(arch: str, args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    torch.manual_seed(0)
    if arch == "inception_v3":  # its auxiliary classifier needs its own 299 px
        args = argparse.Namespace(**{**vars(args), "size": max(args.size, 299)})
    pixels = torch.randint(0, 256, (args.images, args.size, args.size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (args.images,))
    data = SimpleNamespace(splits={"train": torch.arange(args.images)}, targets=labels)
    task = make_task("binary", ["a", "b"])
    model = create_model(ModelSpec(arch, mode="scratch")).to(memory_format=torch.channels_last)
    source = ImageSource(
        model, pixels, device, get_augmentation("paper"), seed=0, eval_batch_size=8
    )
    opt = build_optimizer(model.parameters(), "adam", 1e-3, 0.0, 0.9)

    def ours() -> None:
        schedule = Schedule(opt, 1, args.batch_size, "last", 0)
        fit(source, data, task, schedule, TrainState(), progress=False, log=lambda _: None)

    def precise_bn() -> None:
        loop.reestimate_batchnorm(
            model, source, data.splits["train"], batch_size=args.batch_size, device=device, amp=None
        )

    bare = create_model(ModelSpec(arch, mode="scratch")).backbone
    head = torch.nn.Linear(model.num_features, 1)
    bare.to(memory_format=torch.channels_last).train()
    bare_opt = build_optimizer(
        list(bare.parameters()) + list(head.parameters()), "adam", 1e-3, 0.0, 0.9
    )
    x = torch.rand(args.images, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last
    )
    y = labels.float()

    def baseline() -> None:
        for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size), strict=True):
            out = bare(xb)
            out = out[0] if isinstance(out, tuple) else out
            loss = F.binary_cross_entropy_with_logits(head(out).squeeze(1), yb)
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {arch} at "
        f"{args.size} px, {args.images} images, batch {args.batch_size}"
    )
    real = loop.reestimate_batchnorm
    loop.reestimate_batchnorm = lambda *a, **k: None  # the steps alone
    try:
        ours(), baseline()  # warm-up
        samples: dict[str, list[float]] = {"medxfer": [], "bare": []}
        for _ in range(args.repeats):
            for name, fn in (("medxfer", ours), ("bare", baseline)):
                started = time.perf_counter()
                fn()
                samples[name].append(args.images / (time.perf_counter() - started))
    finally:
        loop.reestimate_batchnorm = real
    started = time.perf_counter()
    precise_bn()
    bn_seconds = time.perf_counter() - started
    a, b = statistics.median(samples["medxfer"]), statistics.median(samples["bare"])
    # precise BN's share of an epoch of the main job's size (4,694 images, 2,048 re-estimated)
    epoch = 4694 / a
    share = bn_seconds * min(2048, 4694) / args.images / (epoch + bn_seconds * 2048 / args.images)
    print(
        f"{arch}: medxfer {a:.1f} img/s, bare step {b:.1f} img/s, ratio {a / b:.2f}; "
        f"precise BN {args.images / bn_seconds:.0f} img/s, {share:.0%} of a full-data epoch "
        f"[load {os.getloadavg()[0]:.1f}]"
    )


if __name__ == "__main__":
    main()
