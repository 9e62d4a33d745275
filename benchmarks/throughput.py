"""Images per second of medxfer's frozen-backbone feature extraction versus the bare model.

medxfer's path: decoded uint8 images in memory -> float -> gray-to-RGB + normalisation (in the
model) -> backbone, in inference mode, channels-last, batches of `inference_batch_size`.
Baselines, in the same process: the bare torchvision model's forward on random float tensors
already in memory, (1) at the same batch size and memory format (the input pipeline's cost) and
(2) as a tutorial runs it: batch 64, default memory format.

    python benchmarks/throughput.py --archs mobilenet_v2 resnet18 --images 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from medxfer.device import Runtime, inference_batch_size
from medxfer.models.factory import ModelSpec, create_model
from medxfer.training.features import extract_features


def rates(fns: list, images: int, repeats: int) -> list[float]:
    """Median images/second of each function, timed in alternation so that a machine whose
    speed drifts (shared cores, turbo) affects all of them alike."""
    for fn in fns:
        fn()  # warm-up
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            started = time.perf_counter()
            fn()
            out.append(images / (time.perf_counter() - started))
    return [statistics.median(s) for s in samples]


def bare_forward(model, x: torch.Tensor, batch: int):
    def run():
        with torch.inference_mode():
            for chunk in x.split(batch):
                model(chunk)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs",
        nargs="+",
        default=["mobilenet_v2", "resnet18", "shufflenet_v2_x1_0", "densenet121"],
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cpu")
    batch = inference_batch_size(None, device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images "
        f"at {args.size} px, medxfer batch {batch}"
    )
    print(
        f"{'architecture':<22}{'medxfer':>10}{'bare same':>11}{'ratio':>8}"
        f"{'bare bs64':>11}{'ratio':>8}"
    )
    pixels = torch.randint(0, 256, (args.images, args.size, args.size), dtype=torch.uint8)
    indices = torch.arange(args.images)
    for arch in args.archs:
        torch.manual_seed(0)
        model = create_model(ModelSpec(arch, mode="scratch")).eval()
        model.to(memory_format=torch.channels_last)
        bare = torchvision.models.get_model(arch).eval()
        bare_cl = torchvision.models.get_model(arch).eval().to(memory_format=torch.channels_last)
        x = torch.rand(args.images, 3, args.size, args.size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        ours, same, plain = rates(
            [
                lambda m=model: extract_features(
                    m, pixels, indices, Runtime(device, batch_size=batch, progress=False)
                ),
                bare_forward(bare_cl, x_cl, batch),
                bare_forward(bare, x, 64),
            ],
            args.images,
            args.repeats,
        )
        print(
            f"{arch:<22}{ours:>10.1f}{same:>11.1f}{ours / same:>8.2f}{plain:>11.1f}"
            f"{ours / plain:>8.2f}"
        )


if __name__ == "__main__":
    main()
