"""Review of the onnxruntime engine: stale graphs, ``--bn adapt``, colour and multi-class
models, odd batch sizes. The reference is always PyTorch eager on the same module."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medxfer.classification.run import train
from medxfer.classification.trained import TrainedModel
from medxfer.config import RunConfig
from medxfer.data.images import load_image
from medxfer.engine import Engine, OnnxEngine
from medxfer.errors import MedxferError
from medxfer.models.factory import create_model
from medxfer.models.spec import ModelSpec
from medxfer.tasks import make_task
from medxfer.training.features import adapt_batchnorm, frozen_norms
from tests.conftest import MOBILENET_FILE, SHARED

CPU = torch.device("cpu")
BCCD = SHARED / "data" / "bccd" / "BCCD" / "JPEGImages"
needs_weights = pytest.mark.skipif(not MOBILENET_FILE.exists(), reason="no MobileNet v2 weights")


def _relative_error(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """Largest per-row norm of the error over the norm of the reference row."""
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    return float((np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


def _xrays(root: Path, size: int, n: int = 4) -> torch.Tensor:
    files = [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((root / "test" / c).iterdir())[:n]]
    return torch.from_numpy(np.stack([load_image(f, size) for f in files]))


@needs_weights
def test_trained_model_follows_weights_changed_after_first_use(small_kermany, tmp_path):
    """A model used once, then given other weights (``load_state_dict``, as a caller swapping
    heads does), must not keep answering with the graph of the old weights."""
    network = create_model(ModelSpec("mobilenet_v2", outputs=3)).eval()
    cfg = RunConfig(data=str(small_kermany), out=str(tmp_path / "run"), engine="onnxruntime")
    model = TrainedModel(network, cfg, make_task("multiclass", ["a", "b", "c"]))
    model.to(CPU, "onnxruntime", tmp_path / "cache")
    pixels = _xrays(small_kermany, 32)
    before = model.logits(pixels)
    other = create_model(ModelSpec("mobilenet_v2", outputs=3)).state_dict()
    with torch.no_grad():
        other["head.linear.weight"].normal_(0, 1, generator=torch.Generator().manual_seed(1))
    network.load_state_dict(other)
    after = model.logits(pixels)
    ref = Engine(network).logits(pixels[:, None].float() / 255).double().numpy()
    assert _relative_error(after, ref) < 1e-4, "a stale graph: the old weights' answer"
    assert np.abs(after - before).max() > 1e-2  # (the new head does change the answer)


@pytest.mark.integration
@needs_weights
def test_retrained_heads_through_one_cache(small_kermany, tmp_path):
    """Two runs (other seeds: other heads) sharing a cache. Each run's stored test
    probabilities (from onnxruntime features) and its model through onnxruntime, after the
    other run's graphs are in the cache, agree with PyTorch eager on the saved model."""
    base = RunConfig(
        data=str(small_kermany),
        out="",
        image_size=32,
        epochs=2,
        views=1,
        bootstrap=0,
        engine="onnxruntime",
        cache_dir=str(tmp_path / "cache"),
    )
    folders = [
        train(replace(base, out=str(tmp_path / f"s{s}"), seed=s), progress=False, log=print)
        for s in (0, 1)
    ]
    stored = [f.read_predictions("test") for f in folders]
    assert np.abs(stored[0].probability - stored[1].probability).max() > 1e-3
    for folder, rows in zip(folders, stored, strict=True):
        model = TrainedModel.load(folder.path)
        pixels = torch.from_numpy(
            np.stack([load_image(small_kermany / "test" / f, 32) for f in _relative(rows)])
        )
        ref = model.to(CPU, "torch").probabilities(pixels)
        got = model.to(CPU, "onnxruntime", base.cache_dir).probabilities(pixels)
        np.testing.assert_allclose(got, ref, atol=1e-4)
        np.testing.assert_allclose(rows.probability.to_numpy(), ref, atol=1e-4)


@needs_weights
@pytest.mark.xfail(
    strict=True,
    reason="--bn adapt leaves near-zero variances: float32 noise is amplified up to "
    "1/sqrt(eps); torch is ~2e-3 from float64 here, onnxruntime ~3e-2",
)
def test_bn_adapt_features_agree_with_torch(small_kermany, tmp_path):
    """``--bn adapt`` statistics from 24 real X-rays at 64 px, then features of the same
    images: onnxruntime within 1e-4 relative of PyTorch (the issue's requirement)."""
    files = [
        f for c in ("NORMAL", "PNEUMONIA") for f in sorted((small_kermany / "train" / c).iterdir())
    ][::2]
    x = torch.from_numpy(np.stack([load_image(f, 64) for f in files]))[:, None].float() / 255
    network = create_model(ModelSpec("mobilenet_v2")).eval()
    with torch.inference_mode():
        adapt_batchnorm(frozen_norms(network), network.features, x.split(8))
    ref = Engine(network).features(x)
    assert _relative_error(OnnxEngine(network, tmp_path).features(x), ref) < 1e-4


def _relative(rows) -> list[str]:
    """The test files of a predictions table, relative to the data's test folder."""
    return [str(Path(*Path(f).parts[-2:])) for f in rows.file]


@needs_weights
@pytest.mark.skipif(not BCCD.is_dir(), reason="BCCD not present")
def test_colour_multiclass_model_and_odd_batches(tmp_path):
    """Real colour images (3 channels), a 4-class head, batches of 1 and 3 on one graph."""
    files = sorted(BCCD.glob("*.jpg"))[:5]
    pixels = torch.from_numpy(np.stack([load_image(f, 48, "rgb") for f in files]))
    assert pixels.shape == (5, 3, 48, 48)
    network = create_model(ModelSpec("mobilenet_v2", outputs=4)).eval()
    torch.nn.init.normal_(network.head.linear.weight, std=0.5)
    x = pixels.float() / 255
    engine = OnnxEngine(network, tmp_path)
    for part in ("features", "logits"):
        ref = getattr(Engine(network), part)(x)
        got = torch.cat(
            [
                getattr(engine, part)(x[:1]),
                getattr(engine, part)(x[1:4]),
                getattr(engine, part)(x[4:]),
            ]
        )
        assert got.shape == ref.shape
        assert _relative_error(got, ref) < 1e-4
    # a binary head gives (B,) logits, also for a batch of one
    binary = create_model(ModelSpec("mobilenet_v2")).eval()
    one = OnnxEngine(binary, tmp_path).logits(x[:1])
    assert one.shape == (1,)
    assert (one - Engine(binary).logits(x[:1])).abs().max() < 1e-5  # a logit near 0: absolute


def test_a_cpu_run_of_engine_onnxruntime_is_usable_on_another_device(tmp_path):
    """A run trained with ``--engine onnxruntime`` (a CPU choice), used on another device
    without ``--engine``: that device's engine, not an error about an option not given.
    (``meta`` stands in for a GPU: no GPU is needed to choose the engine.)"""
    network = create_model(ModelSpec("mobilenet_v2", weights=None), load_weights=False)
    cfg = RunConfig(data="d", out=str(tmp_path / "run"), engine="onnxruntime")
    model = TrainedModel(network, cfg, make_task("binary", ["a", "b"]))
    assert model.to(CPU).engine.name == "onnxruntime"
    assert model.to(torch.device("meta")).engine.name == "torch"
    with pytest.raises(MedxferError, match="CPU only"):  # asked for explicitly: refused
        model.to(torch.device("meta"), "onnxruntime")


@needs_weights
def test_feature_key_names_the_onnxruntime_version(monkeypatch):
    """Cached features made by one onnxruntime release are not served under another (the
    key already names torch, torchvision and timm); the torch engine's key ignores it."""
    import onnxruntime

    from medxfer.classification.inputs import feature_key
    from medxfer.device import Runtime

    def key(engine: str) -> dict:
        cfg = RunConfig(data="d", out="o", engine=engine)
        data = SimpleNamespace(color="gray")
        return feature_key(SimpleNamespace(cfg=cfg, runtime=Runtime(CPU, engine=engine), data=data))

    before = {e: key(e) for e in ("torch", "onnxruntime")}
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert key("onnxruntime") != before["onnxruntime"]
    assert key("torch") == before["torch"]


def test_cache_command_sees_and_clears_the_engine_graphs(tmp_path, capsys):
    """The exported graphs live in the cache too (one per model and input size, 14 MB for
    MobileNet v2): ``medxfer cache info`` counts them and ``cache clear --engines`` frees them."""
    from medxfer.cli import main

    network = create_model(ModelSpec("mobilenet_v2", weights=None), load_weights=False).eval()
    OnnxEngine(network, tmp_path).features(torch.rand(1, 1, 32, 32))
    graphs = list((tmp_path / "engines").glob("*.onnx"))
    assert len(graphs) == 1
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("engines"))
    assert line.split()[1] == "1"
    assert main(["cache", "clear", "--engines", "--cache-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "engines").exists()


def test_adapted_batchnorm_stays_in_torch_unless_asked():
    """Until onnxruntime agrees with PyTorch on adapted statistics (above), ``auto`` keeps
    ``--bn adapt`` models in PyTorch; other runs and an explicit request are unchanged."""
    from medxfer.config import RunConfig
    from medxfer.engine import resolve_engine

    cpu = torch.device("cpu")
    adapt = RunConfig(data="d", out="o", bn="adapt")
    assert resolve_engine(adapt.engine_request, cpu) == "torch"
    assert RunConfig(data="d", out="o").engine_request == "auto"
    assert resolve_engine(RunConfig(data="d", out="o").engine_request, cpu) == "onnxruntime"
    forced = RunConfig(data="d", out="o", bn="adapt", engine="onnxruntime")
    assert forced.engine_request == "onnxruntime"
    scratch = RunConfig(data="d", out="o", bn="adapt", mode="scratch")  # nothing frozen
    assert scratch.engine_request == "auto"
