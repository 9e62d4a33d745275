"""The CPU fast path against its floor: the bare onnxruntime forward of the same backbone.

Parts (run any subset; each line carries the 1-minute load average, so numbers taken on a busy
machine can be recognised and re-measured):

    python benchmarks/cpu_floor.py --main --floor      # main job cold + warm, ratios to the floor
    python benchmarks/cpu_floor.py --floor --images 11000
    python benchmarks/cpu_floor.py --predict RUN       # predict the 624 test images
    python benchmarks/cpu_floor.py --engines           # torch vs onnxruntime, allocator on/off

``--main`` runs ``medxfer train`` (MobileNet v2 transfer, 224 px, 20 epochs, 2 views) twice in
a fresh cache: cold (decode + features) and warm (new output folder, same cache). ``--floor``
times onnxruntime alone on random tensors for as many image views as that run computes (K
augmented views of train plus one clean view of val and test), at the run's batch size.
``--predict`` times ``predict_files`` on Kermany's test images (the graph export once, then
cached) against PIL decoding + the bare onnxruntime forward in this process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KERMANY = ROOT.parent / "shared" / "data" / "chest_xray"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def bare_graph(size: int) -> bytes:
    """torchvision MobileNet v2 features + pooling, exported by hand."""
    import torchvision

    net = torchvision.models.mobilenet_v2()
    body = torch.nn.Sequential(
        net.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        body,
        (torch.rand(2, 3, size, size),),
        buffer,
        input_names=["x"],
        dynamic_axes={"x": {0: "b"}},
        dynamo=False,
    )
    return buffer.getvalue()


def bare_session(size: int, spinning: bool = True, graph: bytes | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(
        graph or bare_graph(size), options, providers=["CPUExecutionProvider"]
    )


def floor(images: int, size: int, batch: int) -> float:
    """The faster of onnxruntime's two thread policies (workers spinning or sleeping)."""
    best = float("inf")
    for spinning in (True, False):
        session = bare_session(size, spinning)
        x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        session.run(None, {"x": x})
        started = time.perf_counter()
        for _ in range(images // batch):
            session.run(None, {"x": x})
        seconds = (time.perf_counter() - started) * images / (images // batch * batch)
        print(
            f"floor (spinning {spinning}): {images} views, batch {batch}: {seconds:.1f} s "
            f"({images / seconds:.1f} img/s) [{load()}]"
        )
        best = min(best, seconds)
    return best


def main_job(cache: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "MEDXFER_CACHE": str(cache)}
    command = [
        sys.executable,
        "-m",
        "medxfer.cli",
        "train",
        "--data",
        str(KERMANY),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "metrics.json").read_text())


def views_of(metrics: dict, views: int) -> int:
    sizes = metrics["split_sizes"]
    return views * sizes["train"] + sizes.get("val", 0) + sizes["test"]


def predict(run: Path, batch: int) -> None:
    from medxfer.classification.trained import TrainedModel
    from medxfer.data.images import load_image
    from medxfer.inference.predict import expand_inputs, predict_files

    files = expand_inputs([str(KERMANY / "test")])
    model = TrainedModel.load(run)
    cache = tempfile.mkdtemp(prefix="medxfer-bench-")  # empty: the first call exports
    for label in ("first (exports the graph)", "again (graph cached)"):
        model.to(torch.device("cpu"), cache_dir=cache)  # a fresh engine
        started = time.perf_counter()
        predict_files(model, files, batch_size=batch)
        ours = time.perf_counter() - started
        print(f"predict {len(files)} images, {label}: {ours:.1f} s [{load()}]")
    started = time.perf_counter()
    pixels = np.stack([load_image(f, model.resolution) for f in files])
    decoded = time.perf_counter() - started
    x = np.repeat(pixels[:, None].astype(np.float32) / 255, 3, axis=1)
    forwards = []
    for spinning in (True, False):  # the faster of onnxruntime's two thread policies
        graph = bare_graph(model.resolution)
        started = time.perf_counter()  # the session is built in the timing, as predict's is
        session = bare_session(model.resolution, spinning, graph)
        for chunk in np.array_split(x, max(1, len(x) // batch)):
            session.run(None, {"x": np.ascontiguousarray(chunk)})
        forwards.append(time.perf_counter() - started)
    bare = decoded + min(forwards)
    print(f"decode + bare forward: {bare:.1f} s (decode {decoded:.1f} s) [{load()}]")
    print(f"predict speed vs decode + bare forward: {bare / ours:.2f}")


def engines(images: int, size: int, batch: int) -> None:
    """Backbone img/s of each engine, with the allocator tuned and left alone, each in a
    fresh process (mallopt is process-wide and cannot be undone)."""
    for allocator in ("default", "tuned"):
        for engine in ("torch", "onnxruntime"):
            env = {**os.environ, "MEDXFER_ALLOCATOR": allocator}
            command = [
                sys.executable,
                __file__,
                "--forward",
                engine,
                "--images",
                str(images),
                "--size",
                str(size),
                "--batch",
                str(batch),
            ]
            rate = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            print(f"{engine:<12} allocator {allocator:<8} {rate.stdout.strip()} [{load()}]")


def forward(engine_name: str, images: int, size: int, batch: int) -> None:
    """One engine's img/s on random gray batches, as the feature cache runs it."""
    from medxfer.engine import make_engine
    from medxfer.models.factory import ModelSpec, create_model
    from medxfer.runtime import tune_allocator

    tune_allocator()
    net = create_model(ModelSpec("mobilenet_v2", mode="scratch"))
    net = net.to(memory_format=torch.channels_last).eval()
    engine = make_engine(engine_name, net, tempfile.mkdtemp(prefix="medxfer-bench-"))
    x = torch.rand(batch, 1, size, size)
    engine.features(x), engine.features(x)  # export, warm-up
    started = time.perf_counter()
    for _ in range(images // batch):
        engine.features(x)
    print(f"{images // batch * batch / (time.perf_counter() - started):.1f} img/s")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", action="store_true", help="main job, cold then warm")
    parser.add_argument("--floor", action="store_true", help="bare onnxruntime forward")
    parser.add_argument("--predict", type=Path, metavar="RUN", help="predict with this run")
    parser.add_argument("--engines", action="store_true", help="torch vs onnxruntime img/s")
    parser.add_argument("--forward", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help="floor: views (default: the main job's)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--limit-per-class", type=int, help="main: a subset, for a quick look")
    parser.add_argument("--keep", type=Path, help="main: keep the runs and cache here")
    args = parser.parse_args()
    if args.forward:
        return forward(args.forward, args.images or 256, args.size, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    extra = ["--views", str(args.views), "--image-size", str(args.size)]
    if WEIGHTS.exists():  # offline: the ImageNet file beside the checkout
        extra += ["--weights", str(WEIGHTS)]
    if args.limit_per_class:
        extra += ["--limit-per-class", str(args.limit_per_class)]
    images, timings = args.images, {}
    if args.main:
        work = args.keep or Path(tempfile.mkdtemp(prefix="medxfer-bench-"))
        for name, out in (("cold", "cold"), ("warm", "warm")):
            seconds, metrics = main_job(work / "cache", work / out, extra)
            timings[name] = seconds
            print(f"main job {name}: {seconds:.1f} s, split {metrics['seconds']} [{load()}]")
        images = images or views_of(metrics, args.views)
        print(f"runs in {work}")
    if args.floor:
        base = floor(images or 2 * 4694 + 1162, args.size, args.batch)
        for name, seconds in timings.items():
            print(f"main job {name} / floor: {seconds / base:.2f}x")
    if args.predict:
        predict(args.predict, args.batch)
    if args.engines:
        engines(args.images or 256, args.size, args.batch)


if __name__ == "__main__":
    run()
