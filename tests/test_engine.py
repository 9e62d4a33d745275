"""The onnxruntime engine against PyTorch on real X-rays, and how a run records its engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medxfer.cache import read_key
from medxfer.classification.run import FAMILY, evaluate, train
from medxfer.config import RunConfig
from medxfer.data.images import load_image
from medxfer.device import Runtime
from medxfer.engine import Engine, OnnxEngine, make_engine, resolve_engine
from medxfer.errors import MedxferError
from medxfer.models.factory import create_model
from medxfer.models.spec import ModelSpec
from medxfer.storage.folder import RunFolder
from medxfer.training.features import extract_features
from medxfer.training.trainer import Trainer
from tests.conftest import LITE0_FILE, MOBILENET_FILE

CPU = torch.device("cpu")


def _kermany_pixels(root: Path, size: int) -> torch.Tensor:
    """Six normal and six pneumonia training X-rays at ``size`` px."""
    files = [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((root / "train" / c).iterdir())[:6]]
    return torch.from_numpy(np.stack([load_image(f, size) for f in files]))


def _assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-4 relative, per image (norm of the error over the norm of the feature)."""
    got, ref = got.double().numpy(), ref.double().numpy()
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-4, rel.max()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize(
    ("arch", "weights"),
    [("mobilenet_v2", None), ("timm/tf_efficientnet_lite0", LITE0_FILE)],
)
def test_onnxruntime_features_match_torch(small_kermany, tmp_path, arch, weights):
    if not (weights or MOBILENET_FILE).exists():
        pytest.skip("ImageNet weights not present")
    spec = ModelSpec(arch, weights=str(weights) if weights else None)
    network = create_model(spec).to(memory_format=torch.channels_last).eval()
    pixels = _kermany_pixels(small_kermany, 64)
    runtime = Runtime(CPU, batch_size=5, progress=False)
    rows = torch.arange(len(pixels))
    ref = extract_features(network, pixels, rows, runtime)  # torch, in batches of 5
    engine = OnnxEngine(network, tmp_path)
    got = extract_features(network, pixels, rows, runtime, engine=engine)
    _assert_close(got, ref)
    # the whole network (logits) too, and the graphs were exported once into the cache
    x = pixels[:4].unsqueeze(1).float() / 255
    _assert_close(engine.logits(x).view(4, -1), Engine(network).logits(x).view(4, -1))
    graphs = sorted((tmp_path / "engines").glob("*.onnx"))
    assert len(graphs) == 2
    again = OnnxEngine(network, tmp_path)
    again.features(x)
    assert sorted((tmp_path / "engines").glob("*.onnx")) == graphs


def test_engine_rule():
    assert resolve_engine("auto", CPU) == "onnxruntime"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", CPU) == "torch"
    with pytest.raises(MedxferError, match="CPU only"):
        resolve_engine("onnxruntime", torch.device("cuda"))
    with pytest.raises(MedxferError, match="--engine"):
        RunConfig(data="d", out="o", engine="tensorrt")
    assert type(make_engine("torch", torch.nn.Identity(), ".")) is Engine


@pytest.mark.skipif(not MOBILENET_FILE.exists(), reason="MobileNet v2 weights not present")
def test_graph_follows_the_weights(tmp_path):
    """A changed BatchNorm statistic (``--bn adapt``) gets its own graph, never a stale one."""
    network = create_model(ModelSpec("mobilenet_v2")).eval()
    x = torch.rand(2, 1, 32, 32)
    first = OnnxEngine(network, tmp_path).features(x)
    bn = next(m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean += 0.5
    second = OnnxEngine(network, tmp_path).features(x)
    assert len(list((tmp_path / "engines").glob("*.onnx"))) == 2
    _assert_close(second, Engine(network).features(x))
    assert (first - second).norm() > 1e-2 * second.norm()


@pytest.mark.integration
@pytest.mark.skipif(not MOBILENET_FILE.exists(), reason="MobileNet v2 weights not present")
def test_run_records_engine_and_keys_cache(small_kermany, tmp_path):
    """--engine torch then onnxruntime: two feature-cache entries per view, the engine in
    config.json, and both runs score the same test images alike."""
    cache = tmp_path / "cache"
    base = RunConfig(
        data=str(small_kermany),
        out=str(tmp_path / "torch"),
        image_size=32,
        epochs=2,
        views=1,
        bootstrap=0,
        engine="torch",
        cache_dir=str(cache),
    )
    runs = {}
    for engine in ("torch", "onnxruntime"):
        cfg = replace(base, engine=engine, out=str(tmp_path / engine))
        runs[engine] = train(cfg, progress=False, log=lambda _m: None)
        assert runs[engine].read_resolved()["engine"] == engine
    seconds = runs["torch"].read_metrics()["seconds"]
    assert seconds["forward"] > 0 and seconds["augment"] > 0 and seconds["data"] > 0
    assert seconds["total"] >= seconds["data"] + seconds["features"] + seconds["epochs"]
    keys = [read_key(p) for p in (cache / "features").glob("*.chunks")]
    assert sorted(k["engine"] for k in keys) == ["onnxruntime"] * 2 + ["torch"] * 2
    test = {e: run.read_predictions("test").probability.to_numpy() for e, run in runs.items()}
    np.testing.assert_allclose(test["onnxruntime"], test["torch"], atol=1e-4)
    # evaluation through either engine gives the stored probabilities' metrics
    scores = [
        evaluate(runs["torch"].path, str(small_kermany), engine=e, progress=False)["roc_auc"]
        for e in ("torch", "onnxruntime")
    ]
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)
    assert scores[0] == pytest.approx(runs["torch"].read_metrics()["test"]["roc_auc"], abs=1e-9)


def test_resume_under_another_engine_is_allowed(tmp_path):
    """The engine is not a setting that changes results (features agree within 1e-4)."""
    folder = RunFolder(tmp_path / "run")
    a = RunConfig(data="d", out=str(folder.path), engine="torch")
    folder.write_config("classification", a.to_dict(), {"engine": "torch"})
    Trainer(FAMILY, replace(a, engine="onnxruntime")).check_same()  # no error
    with pytest.raises(MedxferError, match="other settings"):
        Trainer(FAMILY, replace(a, lr=0.1)).check_same()


@pytest.mark.skipif(not MOBILENET_FILE.exists(), reason="MobileNet v2 weights not present")
def test_similarity_stage_pools_agree_across_engines(small_kermany):
    from medxfer.similarity.features import gray_batches, stage_features

    network = create_model(ModelSpec("mobilenet_v2")).eval()
    pixels = _kermany_pixels(small_kermany, 64)
    names = ["features.3", "features.18", "pooled"]
    got = {
        engine: stage_features(network, gray_batches(network, pixels, 5), names, CPU, engine=engine)
        for engine in ("torch", "onnxruntime")
    }
    for name in names:
        assert got["torch"][name].shape[0] == len(pixels)
        _assert_close(got["onnxruntime"][name], got["torch"][name])
    _assert_close(got["torch"]["pooled"], Engine(network).features(pixels[:, None] / 255.0))


def test_a_last_batch_of_one_image_joins_the_previous_one_under_batchnorm():
    from torch import nn

    from medxfer.training.loop import _batches

    perm = torch.arange(17)
    with_bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    assert [len(b) for b in _batches(perm, 8, with_bn)] == [8, 9]
    assert torch.equal(torch.cat(_batches(perm, 8, with_bn)), perm)
    assert [len(b) for b in _batches(perm, 8, with_bn.eval())] == [8, 8, 1]
    assert [len(b) for b in _batches(perm, 8, nn.Linear(2, 2))] == [8, 8, 1]
