"""Device selection, mixed precision and input batches: shared by training and inference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from medxfer.errors import MedxferError
from medxfer.shard import ONE, Shard


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MedxferError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedxferError(f"--device {name}: CUDA is not available on this machine")
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on CUDA cards that support it, else fp16 on CUDA; None (fp32) elsewhere."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """Torch ops on a CPU in one intra-op thread, for work too small to share: augmenting a
    batch of 8 images took 7-14x the CPU time with 2 threads than with 1, and an epoch of a
    linear head on cached features 6-40x the time (the threads spin and synchronise; measured
    on 2 busy cores, see benchmarks/README.md)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def to_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S) gray or (B, 3, S, S) colour -> float (B, C, S, S) in [0, 1] on ``device``."""
    x = pixels.to(device, non_blocking=True)
    x = x.unsqueeze(1) if x.ndim == 3 else x
    return x.float().div_(255.0)


def inference_batch_size(requested: int | None, device: torch.device) -> int:
    """Small batches keep a CPU's caches warm (measured: see benchmarks/README.md)."""
    return requested or (256 if device.type == "cuda" else 8)


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, training precision, inference batch size."""

    device: torch.device
    amp: torch.dtype | None = None  # training precision on CUDA; evaluation is always float32
    batch_size: int = 8  # inference batch size
    progress: bool = True
    engine: str = "torch"  # frozen forward passes: torch or onnxruntime (see medxfer.engine)
    shard: Shard = ONE  # this process's part of a data-parallel run (medxfer.shard)

    @classmethod
    def create(
        cls,
        device_name: str = "auto",
        *,
        amp: bool = True,
        batch_size: int | None = None,
        progress: bool = True,
        engine: str = "auto",
    ) -> Runtime:
        from medxfer.engine import resolve_engine

        device = select_device(device_name)
        return cls(
            device,
            amp_dtype(device, amp),
            inference_batch_size(batch_size, device),
            progress,
            resolve_engine(engine, device),
        )
