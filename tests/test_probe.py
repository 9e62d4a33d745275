"""``--head logreg``: the folded linear head gives scikit-learn's own pipeline probabilities
(StandardScaler + LogisticRegression fitted here independently), for every task, and a run
picks its strength on validation; ``--head mlp`` trains and reloads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medxfer.cli import main
from medxfer.tasks import make_task
from medxfer.training.probe import fit_logistic, strengths


def _reference(x, y, c):
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    )
    return model.fit(x, y)


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_folded_probe_equals_sklearn_pipeline_for_every_task(c):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)) * [1, 5, 0.1, 2, 1, 3] + [0, 10, -3, 0, 1, 2]
    binary = (x[:, 0] + rng.normal(size=120) > 0.3).astype(np.int64)
    w, b = fit_logistic(x, binary, make_task("binary", ["N", "P"]), c)
    want = _reference(x, binary, c).predict_proba(x)[:, 1]
    np.testing.assert_allclose(expit(x @ w.T + b)[:, 0], want, atol=1e-6)

    multi = np.digitize(x[:, 0] + x[:, 3], [-1.0, 1.0])
    w, b = fit_logistic(x, multi, make_task("multiclass", ["a", "b", "c"]), c)
    want = _reference(x, multi, c).predict_proba(x)
    np.testing.assert_allclose(softmax(x @ w.T + b, axis=1), want, atol=1e-6)

    labels = np.stack([binary, (x[:, 3] > 0).astype(np.int64)], 1).astype(np.float64)
    labels[rng.random(labels.shape) < 0.25] = np.nan  # unknown entries: left out per label
    w, b = fit_logistic(x, labels, make_task("multilabel", ["A", "B"]), c)
    z = StandardScaler().fit_transform(x)  # the features are all known: standardised on all
    for j in range(2):
        known = ~np.isnan(labels[:, j])
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
        want = lr.fit(z[known], labels[known, j]).predict_proba(z)[:, 1]
        np.testing.assert_allclose(expit(x @ w[j] + b[j]), want, atol=1e-6)


def test_strengths_are_log_spaced_from_1e4_to_1e2():
    np.testing.assert_allclose(strengths(7), 10.0 ** np.arange(-4, 3))
    assert strengths(1).tolist() == [1.0]


@pytest.mark.integration
def test_logreg_run_picks_its_strength_on_validation_and_matches_sklearn(small_kermany, tmp_path):
    """Without augmentation the probe trains on the clean features: refitting scikit-learn
    on the run's own train features at the chosen C gives its test probabilities."""
    from medxfer.api import load
    from medxfer.classification.run import load_data
    from medxfer.device import Runtime, to_input

    run = tmp_path / "run"
    args = ["train", "--data", str(small_kermany), "--out", str(run), "--head", "logreg"]
    common = ["--image-size", "32", "--epochs", "4", "--augment", "none", "--bootstrap", "0"]
    common += ["--engine", "torch"]  # the features this test recomputes with torch
    assert main([*args, *common, "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    history = pd.read_csv(run / "history.csv")
    np.testing.assert_allclose(history.C, strengths(4))
    assert metrics["selected_epoch"] == int(history.epoch[history.val_loss.idxmin()])
    c = metrics["probe_strength"]
    assert c == pytest.approx(strengths(4)[metrics["selected_epoch"] - 1])

    model = load(run)
    ctx = load_data(model.config, Runtime.create("cpu", progress=False))
    with torch.inference_mode():
        model.network.eval()
        features = model.network.features(to_input(ctx.data.pixels[:], torch.device("cpu")))
    features = features.double().numpy()
    y = ctx.data.targets.numpy()
    train, test = ctx.data.splits["train"].numpy(), ctx.data.splits["test"].numpy()
    reference = _reference(features[train], y[train], c).predict_proba(features[test])[:, 1]
    predictions = pd.read_csv(run / "predictions.csv")
    test_rows = predictions[predictions.split == "test"].set_index("file")
    files = [ctx.data.records[i].source for i in test]
    np.testing.assert_allclose(test_rows.loc[files, "probability"], reference, atol=1e-4)
    assert "Head: logreg" in (run / "model_card.md").read_text()


@pytest.mark.integration
def test_mlp_head_trains_reloads_and_logreg_needs_a_frozen_backbone(small_kermany, tmp_path):
    run = tmp_path / "mlp"
    args = ["train", "--data", str(small_kermany), "--image-size", "32", "--bootstrap", "0"]
    assert main([*args, "--out", str(run), "--head", "mlp", "--epochs", "2", "--quiet"]) == 0
    from medxfer.api import load

    model = load(run)
    assert type(model.network.head).__name__ == "MLPHead"
    image = next((small_kermany / "test" / "NORMAL").iterdir())
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p.csv")]) == 0
    bad = [*args, "--out", str(tmp_path / "x"), "--head", "logreg", "--mode", "finetune"]
    assert main(bad) == 2 and not (tmp_path / "x").exists()


def test_stage_features_are_the_pooled_last_three_stages():
    """Against hooks placed here by hand on a separate copy: MobileNet v2's features.16-18
    (160 + 320 + 1280 channels), average-pooled and concatenated; a deep copy taps its own."""
    import copy

    from medxfer.models.factory import create_model
    from medxfer.models.spec import ModelSpec

    spec = ModelSpec("mobilenet_v2", mode="scratch", features="stages")
    model = create_model(spec, load_weights=False).eval()
    assert model.num_features == 160 + 320 + 1280
    plain = copy.deepcopy(model.backbone.network)
    for hooks in (m._forward_hooks for m in plain.modules()):
        hooks.clear()
    seen = {}
    for name in ("features.16", "features.17", "features.18"):
        plain.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.mean((2, 3)))
        )
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        got = model.features(x)
        plain(model.prep(x))
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin.features(x), got)
    want = torch.cat([seen[n] for n in ("features.16", "features.17", "features.18")], 1)
    torch.testing.assert_close(got, want)


@pytest.mark.integration
def test_stage_features_run_and_evaluate_agree(small_kermany, tmp_path):
    """The cached stage features (onnxruntime) and the full network (evaluate) give the same
    validation numbers."""
    from medxfer.api import evaluate

    run = tmp_path / "run"
    args = ["train", "--data", str(small_kermany), "--out", str(run), "--features", "stages"]
    assert main([*args, "--image-size", "32", "--epochs", "2", "--bootstrap", "0", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    val = evaluate(run, str(small_kermany), split="val", progress=False)
    for key in ("roc_auc", "loss"):
        assert val[key] == pytest.approx(metrics["val"][key], abs=1e-4)
