"""Adversarial checks of the numbers: degenerate inputs where a test or an interval has no
information must not be reported as certainty. References are exact permutation tests and the
definition of the bootstrap, not the code under test."""

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medxfer.evaluation.intervals import binary_intervals
from medxfer.evaluation.paired import binary_differences, delong_test, paired_bootstrap


def _exact_permutation_p(y, a, b) -> float:
    """Two-sided p of |AUC(b) - AUC(a)| over every swap of the two models' scores per row."""
    y, a, b = map(np.asarray, (y, a, b))
    observed = abs(roc_auc_score(y, b) - roc_auc_score(y, a))
    hits = total = 0
    for swap in itertools.product([False, True], repeat=len(y)):
        s = np.array(swap)
        pa, pb = np.where(s, b, a), np.where(s, a, b)
        hits += abs(roc_auc_score(y, pb) - roc_auc_score(y, pa)) >= observed - 1e-12
        total += 1
    return hits / total


@pytest.mark.parametrize(
    "y, a, b",
    [
        # one positive: DeLong's variance of the positives' components is undefined
        ([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], [0.1, 0.9, 0.2, 0.3]),
        # a perfect model against a constant one: every component is constant, se = 0
        ([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]),
    ],
)
def test_delong_without_a_variance_gives_no_p_value(y, a, b):
    result = delong_test(np.array(y), np.array(a), np.array(b))
    assert result["diff"] != 0
    assert _exact_permutation_p(y, a, b) >= 0.125  # the data cannot show any difference
    assert math.isnan(result["p_value"])  # was 0.0: certainty from four images


def test_delong_identical_degenerate_models_have_p_one():
    y, a = np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2])
    assert delong_test(y, a, a)["p_value"] == 1.0


def test_one_patient_gives_no_interval():
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.8, 0.3, 0.4, 0.6])
    one = binary_intervals(y, p, 0.5, groups=["A"] * 6, resamples=50)
    # every resample of one cluster is the sample itself: no variability can be estimated
    assert one["clusters"] == 1
    assert all(v is None for v in one["intervals"].values())
    two = binary_intervals(y, p, 0.5, groups=list("AAABBB"), resamples=50)
    assert two["intervals"]["accuracy"] is not None


def test_one_patient_paired_bootstrap_has_no_p_value():
    y = np.array([1, 0, 1, 0])
    a, b = np.array([0.9, 0.1, 0.8, 0.2]), np.array([0.4, 0.6, 0.8, 0.2])
    result = paired_bootstrap(
        binary_differences(y, a, b), 4, groups=["P"] * 4, resamples=50, seed=0
    )
    assert result["p_values"]["accuracy"] is None  # was 0.0
    assert result["intervals"]["accuracy"] is None


def test_temperature_scaling_keeps_the_test_auc():
    """Temperature scaling is monotone, so the test AUC must equal the AUC of the raw logits
    (scikit-learn). The scaled probabilities tie at 1.0 (float64 sigmoids above z ~ 37, and a
    separable validation set drives T to its bound 1/148), so runs rank by ``Task.scores``."""
    from medxfer.evaluation.calibration import fit_temperature
    from medxfer.evaluation.metrics import binary_metrics
    from medxfer.tasks import make_task

    task = make_task("binary", ["NORMAL", "PNEUMONIA"])
    val_z, val_y = np.array([2.0, 1.5, 0.7, -0.3, -1.0, -2.0]), np.array([1, 1, 1, 0, 0, 0])
    temperature = fit_temperature(val_z, val_y)  # separable: the smallest allowed, ~0.0067
    test_z, test_y = np.array([3.0, 1.0, 0.6, 0.5, -0.2, -1.0]), np.array([1, 0, 1, 0, 1, 0])
    prob = task.probabilities(test_z, temperature)
    assert len(np.unique(prob)) < len(prob)  # the probabilities alone have lost the order
    scores = task.scores(test_z, temperature)
    metrics = binary_metrics(test_y, prob, scores=scores)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(test_y, test_z))
    three = make_task("multiclass", ["a", "b", "c"])
    z3 = np.array([[40.0, 0, 0], [45.0, 0, 0], [0, 1, 0], [0, 0, 1], [50.0, 0, 0], [1, 0, 0]])
    y3 = np.array([0, 1, 1, 2, 0, 2])
    from medxfer.evaluation.metrics import multiclass_metrics

    ranked = multiclass_metrics(
        y3, three.probabilities(z3), ["a", "b", "c"], scores=three.scores(z3)
    )
    expected = roc_auc_score(y3 == 0, z3[:, 0] - np.log(np.exp(z3).sum(1)))
    assert ranked["per_class"]["a"]["roc_auc"] == pytest.approx(expected)


def test_evaluate_knows_the_runs_data_by_content_not_path(small_kermany, tmp_path, monkeypatch):
    """A run trained with a relative --data, evaluated from another directory or on a
    byte-identical copy, must use the run's validation split (the dataset's own val images
    were in its training pool); a different dataset keeps its own splits."""
    import shutil

    from medxfer.classification.run import evaluate, train
    from medxfer.config import RunConfig
    from tests.conftest import make_subset

    monkeypatch.chdir(small_kermany.parent)
    cfg = RunConfig(
        data=small_kermany.name,  # relative, as the README's ../shared/data/chest_xray
        out=str(tmp_path / "run"),
        image_size=32,
        epochs=1,
        bootstrap=0,
        val_fraction=0.25,
    )
    folder = train(cfg, progress=False, log=lambda _: None)
    metrics = folder.read_metrics()
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(small_kermany, copy)
    for location in (str(small_kermany), str(copy)):
        val = evaluate(folder.path, location, split="val", progress=False)
        assert val["split_source"] == "the run's splits", location
        assert val["n"] == metrics["split_sizes"]["val"] != 8
        assert val["roc_auc"] == pytest.approx(metrics["val"]["roc_auc"], abs=1e-9)
    other = make_subset(tmp_path / "other", {"train": 24, "val": 4, "test": 10}, offset=4)
    val = evaluate(folder.path, str(other), split="val", progress=False)
    assert val["split_source"] == "the dataset's own splits" and val["n"] == 8
