"""Numbers a run reports can be trusted: BatchNorm adaptation against brute force, the test set
never chooses anything, evaluate scores the run's own splits, the feature cache never mixes
settings, and the losses are what their names say."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss

from medxfer.classification.run import evaluate, train
from medxfer.config import RunConfig
from medxfer.data.prepared import DataOptions, prepare_data
from medxfer.device import Runtime, to_input
from medxfer.models.factory import create_model
from medxfer.models.spec import ModelSpec
from medxfer.tasks import make_task
from medxfer.training.features import adapt_batchnorm, frozen_norms

QUIET = dict(progress=False, log=lambda _: None)


def _pixels(kermany: Path, n: int = 12, size: int = 64) -> torch.Tensor:
    data = prepare_data(
        str(kermany), size, DataOptions(val_fraction=0, limit_per_class=n), progress=False
    )
    return data.pixels[data.splits["train"]]


def _adapted(pixels: torch.Tensor, batch: int, spec: ModelSpec):
    model = create_model(spec).eval()
    norms = frozen_norms(model)
    with torch.inference_mode():
        adapt_batchnorm(
            norms,
            lambda x: model.features(to_input(x, torch.device("cpu"))),
            pixels.split(batch),
        )
    return model, norms


@pytest.mark.integration
def test_bn_adapt_equals_brute_force_and_ignores_batch_size(kermany):
    pixels = _pixels(kermany)
    spec = ModelSpec("mobilenet_v2", "transfer", bn="adapt")
    small, norms_small = _adapted(pixels, 3, spec)
    _, norms_large = _adapted(pixels, 8, spec)
    for a, b in zip(norms_small, norms_large, strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.running_var, b.running_var, atol=1e-5, rtol=1e-5)
    # the first BatchNorm sees conv(prep(x)): its statistics over every pixel, by brute force
    fresh = create_model(spec).eval()
    with torch.no_grad():
        conv_out = fresh.backbone.features[0][0](fresh.prep(pixels.unsqueeze(1).float() / 255))
    x = conv_out.double()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=True)
    bn = small.backbone.features[0][1]
    torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), var, atol=1e-4, rtol=1e-4)
    # and it moved away from ImageNet's statistics
    assert not torch.allclose(fresh.backbone.features[0][1].running_var, bn.running_var)


def test_partial_mode_adapts_only_its_frozen_stages():
    model = create_model(ModelSpec("resnet18", "partial", bn="adapt", trainable_stages=2), False)
    frozen = {id(m) for m in frozen_norms(model)}
    trainable = {id(m) for m in model.backbone.layer4.modules()}
    trainable |= {id(m) for m in model.backbone.layer3.modules()}
    assert frozen and not frozen & trainable
    assert id(model.backbone.bn1) in frozen


def test_reported_losses_are_plain_cross_entropy():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(0, 3, 50))
    y = torch.tensor(rng.integers(0, 2, 50))
    task = make_task("binary", ["a", "b"])
    p = 1 / (1 + np.exp(-logits.numpy()))
    assert float(task.loss(logits, y)) == pytest.approx(log_loss(y.numpy(), p), rel=1e-6)
    weights = task.class_weights(y)
    n, pos = len(y), int(y.sum())
    assert weights.tolist() == pytest.approx([n / (2 * (n - pos)), n / (2 * pos)])
    per = -(y.numpy() * np.log(p) + (1 - y.numpy()) * np.log(1 - p))
    expected = np.mean(per * weights.numpy()[y.numpy()])
    assert float(task.loss(logits, y, weights)) == pytest.approx(expected, rel=1e-6)
    multi = make_task("multiclass", ["a", "b", "c"])
    z = torch.tensor(rng.normal(0, 2, (40, 3)))
    t = torch.tensor(rng.integers(0, 3, 40))
    soft = np.exp(z.numpy()) / np.exp(z.numpy()).sum(1, keepdims=True)
    assert float(multi.loss(z, t)) == pytest.approx(log_loss(t.numpy(), soft), rel=1e-6)


def _manifest(folder: Path, out: Path, shuffle_test: bool) -> Path:
    rows = []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for f in sorted((folder / split / cls).iterdir()):
                rows.append({"path": str(f), "label": cls, "split": split})
    frame = pd.DataFrame(rows)
    if shuffle_test:
        test = frame.split == "test"
        labels = frame.loc[test, "label"].to_numpy()
        frame.loc[test, "label"] = np.random.default_rng(3).permutation(labels)
    frame.to_csv(out, index=False)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("head, tta", [("paper", 1), ("logreg", 1), ("mlp", 1), ("paper", 3)])
def test_shuffled_test_labels_change_no_choice(small_kermany, tmp_path, head, tta):
    """The test set may never choose anything: with its labels shuffled the selected epoch
    (for logreg: the strength C), threshold, temperature and every validation number stay
    exactly the same."""
    results = {}
    for shuffled in (False, True):
        data = _manifest(small_kermany, tmp_path / f"m{shuffled}.csv", shuffled)
        cfg = RunConfig(
            data=str(data),
            out=str(tmp_path / f"run{shuffled}"),
            head=head,
            tta=tta,
            image_size=64,
            epochs=3,
            bootstrap=0,
            threshold="youden",
            calibrate="temperature",
            select="val_auc",
            val_fraction=0.25,
        )
        folder = train(cfg, **QUIET)
        results[shuffled] = (folder.read_metrics(), folder.read_history())
    (m0, h0), (m1, h1) = results[False], results[True]
    for key in ("selected_epoch", "thresholds", "split_sizes"):
        assert m0[key] == m1[key]
    assert m0["calibration"]["temperature"] == m1["calibration"]["temperature"]
    assert json.dumps(m0["val"], sort_keys=True) == json.dumps(m1["val"], sort_keys=True)
    val_columns = [c for c in h0.columns if c.startswith(("val_", "train_"))]
    pd.testing.assert_frame_equal(h0[val_columns], h1[val_columns])
    # the shuffle did reach the test numbers (a confusion matrix alone may repeat by chance)
    assert (m0["test"]["confusion_matrix"], m0["test"]["roc_auc"]) != (
        m1["test"]["confusion_matrix"],
        m1["test"]["roc_auc"],
    )


@pytest.mark.integration
def test_evaluate_uses_the_runs_own_splits(small_kermany, tmp_path):
    cfg = RunConfig(
        data=str(small_kermany),
        out=str(tmp_path / "run"),
        image_size=64,
        epochs=1,
        bootstrap=0,
        val_fraction=0.25,
        limit_per_class=16,
    )
    folder = train(cfg, **QUIET)
    metrics = folder.read_metrics()
    val = evaluate(folder.path, str(small_kermany), split="val", progress=False)
    assert val["n"] == metrics["split_sizes"]["val"] != 8  # not the dataset's 8 val images
    assert val["split_source"] == "the run's splits"
    for key in ("accuracy", "roc_auc", "loss"):  # the full network vs backbone + head: 1e-6
        assert val[key] == pytest.approx(metrics["val"][key], abs=1e-6)
    test = evaluate(folder.path, str(small_kermany), split="test", progress=False)
    assert test["n"] == metrics["test"]["n"] == 20  # the run's subset of test (10 per class)
    assert test["roc_auc"] == pytest.approx(metrics["test"]["roc_auc"], abs=1e-6)


@pytest.mark.integration
def test_feature_cache_keys_every_setting(small_kermany, tmp_path):
    from medxfer.classification.context import Context
    from medxfer.classification.inputs import feature_key
    from medxfer.classification.run import load_data

    cfg = RunConfig(data=str(small_kermany), out=str(tmp_path / "r"), image_size=64)
    ctx = load_data(cfg, Runtime.create("cpu", progress=False))
    key = feature_key(ctx)
    assert {"weights", "decoder", "libraries", "color", "device"} <= set(key)
    timm_cfg = replace(cfg, arch="timm/tf_efficientnet_lite0")
    timm_key = feature_key(Context(timm_cfg, ctx.runtime, ctx.data, ctx.task, ctx.cache_dir))
    assert "timm/tf_efficientnet_lite0" in timm_key["weights"]
    assert "in1k" in timm_key["weights"]  # the pretrained tag timm resolves to


def test_weights_identity_is_the_files_content(tmp_path):
    """A stand-in file under the ImageNet file's name must not share its cached features."""
    from medxfer.models.factory import weights_digest
    from medxfer.models.spec import ModelSpec

    spec = ModelSpec("mobilenet_v2", "transfer")
    real = weights_digest(spec)
    previous = torch.hub.get_dir()
    try:
        torch.hub.set_dir(str(tmp_path / "hub"))
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        (tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").write_bytes(b"other")
        stand_in = weights_digest(spec)
    finally:
        torch.hub.set_dir(previous)
    assert real.startswith("mobilenet_v2-b0353104.pth:") and stand_in != real
