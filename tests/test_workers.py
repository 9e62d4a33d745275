"""Data-parallel runs on Ray Train (CPU, gloo) against one-process runs of the same options,
on a real Kermany subset at 64 px; and the pieces underneath without Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from medxfer import api
from medxfer.data.augment import (
    Augmentation,
    apply_augmentation,
    augment_batch,
    draw_augmentation,
    take_rows,
)
from medxfer.shard import Shard
from medxfer.storage.folder import RunFolder
from medxfer.storage.model_file import read_model_file
from medxfer.tasks import make_task
from medxfer.training.parallel import data_parallel

ray = pytest.importorskip("ray")

# One epoch of ResNet-18 from scratch (no ImageNet download, no dropout: a network with dropout
# draws each worker's masks on its own, equal to one process only in distribution) in one SGD
# step: global batch 64 over the 43 training images, 22 and 21 per worker. Over several steps
# float32 rounding (a sum over two workers against one sum) grows in a from-scratch network
# (measured: 1.4% of the update after 3 steps at lr 0.01; one worker against one process
# 11%); test_data_parallel_steps_equal_one_process_in_float64 checks several steps exactly.
SCRATCH = dict(
    arch="resnet18",
    mode="scratch",
    image_size=64,
    epochs=1,
    batch_size=64,
    augment="none",
    optimizer="sgd",
    lr=0.01,
    bootstrap=0,
    engine="torch",
)
TRANSFER = dict(mode="transfer", image_size=64, epochs=3, bootstrap=0, views=2)


# -- without Ray -------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 130])
def test_shards_partition_every_batch_and_pass(world, n):
    shards = [Shard(r, world) for r in range(world)]
    positions = torch.cat([s.positions(n) for s in shards])
    assert positions.tolist() == list(range(n))
    rows = sorted(i for s in shards for b in s.batches(n, 8) for i in b)
    assert rows == list(range(n))
    for s in shards:  # batch i of the pass is worker i % world's
        assert all(b.start // 8 % world == s.rank for b in s.batches(n, 8))


def test_drawn_augmentation_of_some_rows_equals_the_whole_batch_augmented():
    x = torch.rand(6, 1, 32, 32)
    aug = Augmentation()
    whole = augment_batch(x, aug, torch.Generator().manual_seed(3))
    params = draw_augmentation(6, aug, torch.Generator().manual_seed(3))
    keep = torch.tensor([1, 2, 5])
    part = apply_augmentation(x[keep], take_rows(params, keep))
    torch.testing.assert_close(part, whole[keep], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["binary", "multiclass", "multilabel"])
def test_loss_sum_over_its_normaliser_is_the_loss(name):
    g = torch.Generator().manual_seed(0)
    classes = ["a", "b", "c"]
    task = make_task(name, classes if name != "binary" else ["n", "p"])
    if name == "multiclass":
        logits, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
        weights = torch.tensor([0.5, 1.0, 2.0])
    elif name == "binary":
        logits, y = torch.randn(10, generator=g), torch.randint(0, 2, (10,), generator=g)
        weights = torch.tensor([0.7, 1.9])
    else:
        logits = torch.randn(10, 3, generator=g)
        y = torch.randint(0, 2, (10, 3), generator=g).float()
        y[2, 1] = y[5, 0] = float("nan")
        weights = torch.tensor([0.6, 1.4])
    for w in (None, weights):
        halves = [slice(0, 4), slice(4, 10)]  # two workers' rows of one batch
        total = sum(task.loss_sum(logits[h], y[h], w) for h in halves)
        torch.testing.assert_close(total / task.loss_normalizer(y, w), task.loss(logits, y, w))


def _sync_bn_worker(rank: int, port: int, x: torch.Tensor, out: dict) -> None:
    from medxfer.training.parallel import GlooBatchNorm

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    torch.manual_seed(0)
    bn = GlooBatchNorm(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    part = x[:3] if rank == 0 else x[3:]
    part = part.clone().requires_grad_(True)
    y = bn(part)
    (y * _wave(y)).sum().backward()
    out[rank] = {
        "y": y.detach(),
        "grad": part.grad,
        "weight_grad": bn.weight.grad.clone(),
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }
    torch.distributed.destroy_process_group()


def test_gloo_batchnorm_equals_batchnorm_on_the_whole_batch():
    """Two processes holding 3 and 5 images: outputs, input and weight gradients and running
    statistics equal torch's BatchNorm2d on all 8 (the reference)."""
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 1
    out = mp.Manager().dict()
    mp.spawn(_sync_bn_worker, args=(_free_port(), x, out), nprocs=2, join=True)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    xs = x.clone().requires_grad_(True)
    y = ref(xs)
    ((y[:3] * _wave(y[:3])).sum() + (y[3:] * _wave(y[3:])).sum()).backward()
    torch.testing.assert_close(torch.cat([out[0]["y"], out[1]["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([out[0]["grad"], out[1]["grad"]]), xs.grad)
    torch.testing.assert_close(out[0]["weight_grad"] + out[1]["weight_grad"], ref.weight.grad)
    for rank in (0, 1):
        torch.testing.assert_close(out[rank]["running_mean"], ref.running_mean)
        torch.testing.assert_close(out[rank]["running_var"], ref.running_var)


def _wave(y: torch.Tensor) -> torch.Tensor:
    """Fixed, uneven output weights: a loss whose gradient reaches every input differently."""
    return torch.arange(y.numel()).float().sin().view_as(y)


def _steps_worker(rank: int, port: int, world: int, out: dict) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    shard = Shard(rank, world, distributed=True)
    network = _resnet()
    out[world] = _sgd_steps(network, data_parallel(network, torch.device("cpu"), shard), shard)
    torch.distributed.destroy_process_group()


def _resnet() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=1).double()


def _sgd_steps(network: nn.Module, trained: nn.Module, shard: Shard | None) -> torch.Tensor:
    """Three SGD steps with momentum over 43 images in batches of 16: each worker's rows'
    summed loss over the whole batch's count, times the worker count (as the loop does)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(43, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (43,), generator=g).double()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    network.train()
    for start in range(0, 43, 16):
        xb, yb = x[start : start + 16], y[start : start + 16]
        keep = shard.positions(len(xb)) if shard else torch.arange(len(xb))
        z = trained(xb[keep]).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(z, yb[keep], reduction="sum") / len(xb)
        optimizer.zero_grad()
        (loss * (shard.world if shard else 1)).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in network.parameters()])


def test_data_parallel_steps_equal_one_process_in_float64():
    """DistributedDataParallel with synchronised BatchNorm on 1 and 2 workers against plain
    BatchNorm in one process (the reference): in float64, rounding cannot hide a wrong
    gradient, so the three agree to 1e-12 of the update."""
    start = torch.cat([p.detach().flatten() for p in _resnet().parameters()])
    network = _resnet()
    one = _sgd_steps(network, network, None)
    out = mp.Manager().dict()
    for world in (1, 2):
        mp.spawn(_steps_worker, args=(_free_port(), world, out), nprocs=world, join=True)
    for world in (1, 2):
        error = (out[world] - one).norm() / (one - start).norm()
        assert error < 1e-12, (world, error.item())
    assert (one - start).norm() > 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_synchronised_batchnorm_leaves_frozen_layers_and_refuses_fused_ones(
    small_kermany, tmp_path
):
    """--mode partial keeps its frozen BatchNorm in eval mode with ImageNet statistics; timm's
    BatchNormAct2d (normalise + activation) cannot become a plain synchronised BatchNorm."""
    import timm

    from medxfer.config import RunConfig
    from medxfer.errors import MedxferError
    from medxfer.models.factory import create_model
    from medxfer.training.parallel import GlooBatchNorm, synchronise_batchnorm

    cfg = RunConfig(data=str(small_kermany), out=str(tmp_path / "x"), mode="partial")
    network = create_model(cfg.model_spec)
    frozen_norms = [
        m for part in network.frozen for m in part.modules() if isinstance(m, nn.BatchNorm2d)
    ]
    synchronise_batchnorm(network, torch.device("cpu")).train()
    assert frozen_norms and all(type(m) is nn.BatchNorm2d for m in frozen_norms)
    assert not any(m.training for part in network.frozen for m in part.modules())
    trained = [m for m in network.modules() if isinstance(m, GlooBatchNorm)]
    assert trained and all(m.training for m in trained)
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1)
    with pytest.raises(MedxferError, match="BatchNormAct2d"):
        synchronise_batchnorm(lite, torch.device("cpu"))


def test_ray_is_not_imported_without_workers(small_kermany, tmp_path):
    code = (
        "import sys; from medxfer import api; "
        f"api.train({str(small_kermany)!r}, {str(tmp_path / 'run')!r}, quiet=True, "
        "image_size=32, epochs=1, bootstrap=0); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -- on Ray Train ------------------------------------------------------------------------
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_model_file(run).state_dict


def _features(cache: Path) -> dict[str, np.ndarray]:
    """Every stored feature array of a cache, by entry name (the hash of its key)."""
    found = {}
    for entry in (cache / "features").glob("*.chunks"):
        header = json.loads((entry / "header.json").read_text())
        found[entry.name] = np.fromfile(entry / "data", np.float32).reshape(header["shape"])
    return found


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module's runs (each run would otherwise start one)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_two_workers_train_the_weights_of_one_process(small_kermany, tmp_path, ray_local):
    one = api.train(small_kermany, tmp_path / "one", quiet=True, workers=1, **SCRATCH).path
    two = api.train(small_kermany, tmp_path / "two", quiet=True, workers=2, **SCRATCH).path
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    start = _initial_weights(small_kermany, tmp_path)
    moved = max((a[k] - start[k]).abs().max().item() for k in a if a[k].ndim == 4)
    assert moved > 1e-3  # the epoch moved the convolutions: not a comparison of two inits
    history = [pd.read_csv(r / RunFolder.HISTORY) for r in (one, two)]
    np.testing.assert_allclose(history[1].train_loss, history[0].train_loss, rtol=1e-6)
    config = json.loads((two / RunFolder.CONFIG).read_text())
    assert config["run"]["workers"] == 2
    assert (
        json.loads((two / RunFolder.METRICS).read_text())["test"].keys()
        == json.loads((one / RunFolder.METRICS).read_text())["test"].keys()
    )


def _initial_weights(data: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The network a run of SCRATCH starts from."""
    from medxfer.classification.run import build_network, load_data
    from medxfer.config import RunConfig
    from medxfer.device import Runtime

    cfg = RunConfig(data=str(data), out=str(tmp_path / "unused"), **SCRATCH)
    ctx = load_data(cfg, Runtime.create("cpu", progress=False))
    return build_network(ctx).state_dict()


@pytest.mark.integration
def test_two_workers_extract_the_features_of_one_process(small_kermany, tmp_path, ray_local):
    runs = {}
    for name, workers in (("one", 0), ("two", 2)):
        cache = tmp_path / f"cache_{name}"
        runs[name] = api.train(
            small_kermany,
            tmp_path / name,
            quiet=True,
            workers=workers,
            cache_dir=str(cache),
            eval_batch_size=4,
            **TRANSFER,
        ).path
    a, b = _features(tmp_path / "cache_one"), _features(tmp_path / "cache_two")
    assert len(a) == 3 and a.keys() == b.keys()  # clean, two augmented views, by key
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5)
        assert np.abs(a[name]).sum(1).min() > 0  # every row was written
    p, q = (pd.read_csv(runs[n] / RunFolder.PREDICTIONS) for n in ("one", "two"))
    np.testing.assert_allclose(q.probability, p.probability, atol=1e-6)


def _ray_workers() -> list[int]:
    """Process ids of Ray Train's worker actors (their command line names the class)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(
    small_kermany, tmp_path, ray_local
):
    options = dict(SCRATCH, epochs=3, image_size=32, batch_size=16)
    whole = api.train(small_kermany, tmp_path / "whole", quiet=True, workers=2, **options).path
    cut = tmp_path / "cut"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (cut / RunFolder.CHECKPOINT).exists():
            time.sleep(0.2)
        workers = _ray_workers()
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    api.train(small_kermany, cut, quiet=True, workers=2, **options)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    a, b = pd.read_csv(whole / RunFolder.HISTORY), pd.read_csv(cut / RunFolder.HISTORY)
    assert list(b.epoch) == [1, 2, 3]
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=1e-6)
    m, n = (json.loads((r / RunFolder.METRICS).read_text())["test"] for r in (whole, cut))
    for key in ("loss", "accuracy", "roc_auc"):
        assert n[key] == pytest.approx(m[key], abs=1e-6), key


@pytest.mark.integration
def test_a_started_cluster_is_used_through_address(small_kermany, tmp_path):
    """``ray start --head``, then ``medxfer train --workers 2 --address`` in its own process
    (as a user runs it); the cluster runs on after the run."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # the cluster and the client alike
    port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(start, check=True, timeout=300, capture_output=True, env=env)
    try:
        run = tmp_path / "run"
        command = [sys.executable, "-m", "medxfer.cli", "train", "--data", str(small_kermany)]
        command += ["--out", str(run), "--quiet", "--workers", "2"]
        command += ["--address", f"127.0.0.1:{port}", "--mode", "transfer", "--image-size", "64"]
        command += ["--epochs", "1", "--views", "1", "--bootstrap", "0"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (run / RunFolder.METRICS).exists()
        assert json.loads((run / RunFolder.CONFIG).read_text())["run"]["workers"] == 2
        status = subprocess.run(
            [ray_bin, "status", f"--address=127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert status.returncode == 0, status.stderr
    finally:
        subprocess.run([ray_bin, "stop", "--force"], timeout=300, capture_output=True, env=env)
