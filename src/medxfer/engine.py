"""Inference engines: who runs a frozen network forward.

On a CPU, onnxruntime runs the same fp32 CNN about twice as fast as PyTorch eager (it fuses
BatchNorm into convolutions, pre-packs weights and reuses its buffers; measured in
benchmarks/), so a frozen backbone's features and a trained model's logits go through an ONNX
graph there; on CUDA and MPS PyTorch is used. The rule is fixed (no timing probe at run time):
``auto`` = onnxruntime on a CPU, torch elsewhere.

Both engines take float input (B, C, S, S) in [0, 1] (what ``device.to_input`` and the batch
augmentation produce) and return float32 CPU tensors. The graph is exported once per module
state and input shape and kept on disk (``<cache>/engines``), so a run, its evaluation and
``medxfer predict`` export it at most once.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medxfer.atomic import write_with
from medxfer.config import ENGINES
from medxfer.errors import MedxferError

GRAPH_VERSION = 1  # bump when the exported graphs change


def resolve_engine(name: str, device: torch.device) -> str:
    """The engine a run uses: ``auto`` is onnxruntime on a CPU and torch elsewhere."""
    if name not in ENGINES:
        raise MedxferError(f"--engine {name!r}: choose from {', '.join(ENGINES)}")
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" else "torch"
    if name == "onnxruntime" and device.type != "cpu":
        raise MedxferError(f"--engine onnxruntime runs on the CPU only, not on {device.type}")
    return name


def own_engine(recorded: str) -> str:
    """A finished run's ``--engine`` when its model is used (``evaluate``, ``predict``) with no
    ``--engine`` given: ``onnxruntime`` was chosen for a CPU, and on a GPU it stands for that
    device's engine (``auto``) rather than refusing a device the user did not ask about."""
    return "auto" if recorded == "onnxruntime" else recorded


class Engine:
    """Forward passes of one network in eval mode: ``features`` (backbone) and ``logits``;
    ``outputs`` runs any other module built on it (the similarity's per-stage pools)."""

    name = "torch"

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.features(x).float().cpu()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).float().cpu()

    @torch.inference_mode()
    def outputs(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Kept on the module's device: the similarity distances are computed there."""
        out = module(x)
        return tuple(o.float() for o in (out if isinstance(out, tuple) else (out,)))


class OnnxEngine(Engine):
    """The same calls through onnxruntime graphs exported from the torch module, each built
    from the weights and statistics the module has when it is used; a session is kept while
    none of them has changed (``_stamp``), so new weights (``load_state_dict``, ``--bn
    adapt``, a trained head) never meet a stale graph."""

    name = "onnxruntime"

    def __init__(self, network: nn.Module, cache_dir: str | Path) -> None:
        super().__init__(network)
        self.folder = Path(cache_dir) / "engines"
        self.parts = {part: _Part(network, part) for part in ("features", "logits")}
        self.sessions: dict[tuple, tuple[tuple, object]] = {}  # (module, shape): (stamp, session)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(self.parts["features"], x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(self.parts["logits"], x)[0]

    def outputs(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key, stamp = (id(module), tuple(x.shape[1:])), _stamp(module)
        held = self.sessions.get(key)
        session = held[1] if held and held[0] == stamp else self._session(module, key[1], stamp)
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        # Copied into torch's allocator: kept as numpy arrays, each batch's small output sat
        # among onnxruntime's freed ~1.5 MB run buffers and glibc could not reuse the holes, so
        # a feature extraction's memory grew by ~200 kB per image (measured; a numpy copy grew
        # the same way, a torch clone stays flat)
        return tuple(torch.from_numpy(a).clone() for a in session.run(None, {"image": array}))

    def _session(self, module: nn.Module, shape: tuple[int, ...], stamp: tuple):
        """The module's graph from the cache (exported on a miss), in an onnxruntime session
        with as many intra-op threads as torch has."""
        import onnxruntime as ort

        module.eval()
        path = self.folder / f"{graph_key(module, shape)}.onnx"
        if not path.exists():
            write_with(path, lambda tmp: tmp.write_bytes(export_onnx(module, shape)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle workers sleep instead of spinning between batches: spinning took the cores
        # from the augmentation of the next batch (2x the CPU time for the same work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.sessions[(id(module), shape)] = (stamp, session)
        return session


def _stamp(module: nn.Module) -> tuple:
    """Cheap identity of a module's current tensors: which storage each uses and its version
    counter, which every in-place change (``copy_`` in ``load_state_dict``, an optimiser
    step, BatchNorm statistics) increments. Hashing the values (``graph_key``) is exact but
    costs milliseconds per batch; this is checked on every batch."""
    stamp = []
    for tensor in module.state_dict(keep_vars=True).values():
        try:
            stamp.append((tensor.data_ptr(), tensor._version))
        except RuntimeError:  # an inference tensor has no version counter: hash its values
            stamp.append(hashlib.sha1(tensor.detach().cpu().numpy().tobytes()).hexdigest())
    return tuple(stamp)


def make_engine(name: str, network: nn.Module, cache_dir: str | Path) -> Engine:
    """The engine called ``name`` (resolved: torch or onnxruntime) for ``network``; mixed
    precision, where a caller wants it, is its ``autocast`` around the torch engine."""
    if name == "onnxruntime":
        return OnnxEngine(network, cache_dir)
    return Engine(network)


def graph_key(module: nn.Module, shape: tuple[int, ...]) -> str:
    """Digest of everything an exported graph depends on: the modules it is made of and every
    parameter and buffer (so adapted BatchNorm statistics or a trained head get their own
    graph), the input shape without batch, and the library versions."""
    import onnxruntime

    digest = hashlib.sha256()
    header = [GRAPH_VERSION, repr(module), list(shape), torch.__version__, onnxruntime.__version__]
    digest.update(repr(header).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def export_onnx(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """ONNX bytes of ``module`` with a dynamic batch axis. The TorchScript exporter is used:
    for these CNNs it is several times quicker than the dynamo exporter and as exact."""
    example = torch.rand(2, *shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = module(example)
        outputs = [f"output{i}" for i in range(len(out) if isinstance(out, tuple) else 1)]
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


class _Part(nn.Module):
    """One of a classifier's forward passes as a module of its own, for the exporter: the
    features hold only ``prep`` and ``backbone`` (a new head does not change their graph)."""

    def __init__(self, network: nn.Module, part: str) -> None:
        super().__init__()
        self.part = part
        if part == "features":
            self.prep, self.backbone = network.prep, network.backbone
        else:
            self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part == "logits":
            return self.network(x)
        out = self.backbone(self.prep(x))
        return out[0] if isinstance(out, tuple) else out

    def extra_repr(self) -> str:
        return self.part
