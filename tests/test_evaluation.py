"""medxfer.evaluation against independent references: scikit-learn, scipy, brute force."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.special import expit, softmax
from scipy.stats import norm
from sklearn import metrics as skm

from medxfer.errors import MedxferError
from medxfer.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    top_label_ece,
)
from medxfer.evaluation.intervals import (
    binary_intervals,
    bootstrap_intervals,
    resample_rows,
)
from medxfer.evaluation.metrics import (
    HEADLINE,
    average_precision,
    binary_metrics,
    multiclass_metrics,
    multilabel_metrics,
    roc_auc,
    scalar_metrics,
    task_metrics,
)
from medxfer.evaluation.paired import (
    binary_differences,
    delong_covariance,
    delong_test,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    structural_components,
)
from medxfer.evaluation.thresholds import choose_threshold, choose_thresholds


def _cases(count, *, seed=0, ties=True):
    """Random binary cases of varied size and prevalence; ``ties`` rounds probabilities."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(4, 60))
        y = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        p = np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1)
        yield y, (np.round(p, 1) if ties else p)


# --- binary metrics ---------------------------------------------------------------------------


def test_binary_metrics_equal_sklearn_with_ties():
    for y, p in _cases(60):
        t = float(np.random.default_rng(len(y)).choice(p))
        m = binary_metrics(y, p, t)
        pred = (p >= t).astype(int)
        recall = skm.recall_score(y, pred, zero_division=0)
        specificity = skm.recall_score(y, pred, pos_label=0, zero_division=0)
        assert m["loss"] == pytest.approx(skm.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
        assert m["recall"] == pytest.approx(recall)
        assert m["specificity"] == pytest.approx(specificity)
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
        assert m["gmean"] == pytest.approx(math.sqrt(recall * specificity))
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
        assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
        assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
        assert m["n"] == len(y) and m["threshold"] == t


def test_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.4, 0.7])
    m = binary_metrics(y, p)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["gmean"] == pytest.approx(np.sqrt(2 / 3 * 1 / 2))
    assert m["roc_auc"] == pytest.approx(3 / 6)  # 3 of 6 pairs ranked right
    expected_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert m["loss"] == pytest.approx(expected_loss)


def test_degenerate_predictions_are_defined():
    y = np.array([1, 0, 1, 0])
    m = binary_metrics(y, np.zeros(4))  # predicts the negative class only
    assert m["precision"] == 0 and m["recall"] == 0 and m["f1"] == 0 and m["gmean"] == 0
    assert m["loss"] == pytest.approx(-np.log(1e-7) / 2)  # clipped inside the log only
    one_class = binary_metrics(np.ones(3, dtype=int), np.array([0.2, 0.8, 0.9]))
    assert one_class["roc_auc"] is None and one_class["average_precision"] is None
    assert one_class["accuracy"] == pytest.approx(2 / 3)


def test_saturated_probabilities_keep_their_order():
    """Clipping to [1e-7, 1 - 1e-7] before ranking would tie expit(25), expit(20), expit(18)."""
    logits = np.array([25.0, 18, 20, -3, 1, -20])
    y = np.array([1, 0, 1, 0, 1, 0])
    m = binary_metrics(y, expit(logits))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, logits))
    assert m["roc_auc"] != pytest.approx(
        skm.roc_auc_score(y, np.clip(expit(logits), 1e-7, 1 - 1e-7))
    )
    rng = np.random.default_rng(1)
    for _ in range(20):
        z = rng.normal(0, 12, 80)
        y = (rng.random(80) < expit(z / 4)).astype(int)
        m = binary_metrics(y, expit(z))
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, z))
        assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, z))
        assert np.isfinite(m["loss"])


def test_rank_metrics_equal_sklearn_on_continuous_and_tied_scores():
    for ties in (True, False):
        for y, p in _cases(50, seed=3, ties=ties):
            assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))
            assert average_precision(y, p) == pytest.approx(skm.average_precision_score(y, p))


def test_binary_input_errors():
    with pytest.raises(MedxferError, match="3 labels but 2 probabilities"):
        binary_metrics([0, 1, 1], [0.2, 0.4])


# --- multi-class and multi-label -------------------------------------------------------------


def _multiclass(n=120, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 1.5 * np.eye(k)[y]
    return y, softmax(logits, axis=1)


def test_multiclass_metrics_equal_sklearn():
    y, prob = _multiclass()
    classes = ["a", "b", "c", "d"]
    m = multiclass_metrics(y, prob, classes)
    pred = prob.argmax(1)
    assert m["loss"] == pytest.approx(skm.log_loss(y, prob))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    for average in ("macro", "weighted"):
        expected = skm.roc_auc_score(y, prob, multi_class="ovr", average=average)
        assert m[f"{average}_roc_auc"] == pytest.approx(expected)
    f1 = skm.f1_score(y, pred, average=None)
    precision = skm.precision_score(y, pred, average=None)
    recall = skm.recall_score(y, pred, average=None)
    for c, name in enumerate(classes):
        got = m["per_class"][name]
        assert (got["f1"], got["precision"], got["recall"]) == pytest.approx(
            (f1[c], precision[c], recall[c])
        )
        assert got["support"] == int(np.sum(y == c))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist() and m["n"] == 120


def test_multiclass_absent_class_has_no_auc():
    y, prob = _multiclass(seed=1)
    y[y == 2] = 0  # class c never occurs
    m = multiclass_metrics(y, prob, ["a", "b", "c", "d"])
    assert m["per_class"]["c"]["roc_auc"] is None
    pred = prob.argmax(1)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    present = [skm.roc_auc_score(y == c, prob[:, c]) for c in (0, 1, 3)]
    assert m["macro_roc_auc"] == pytest.approx(np.mean(present))
    counts = [np.sum(y == c) for c in (0, 1, 3)]
    assert m["weighted_roc_auc"] == pytest.approx(np.average(present, weights=counts))
    assert len(m["confusion_matrix"]) == 4


def test_multiclass_loss_clips_only_inside_the_log():
    prob = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    m = multiclass_metrics(np.array([1, 1, 0]), prob, ["x", "y"])
    assert m["loss"] == pytest.approx((-np.log(1e-7) + 0 - np.log(0.5)) / 3)


def _multilabel(n=150, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.4).astype(int)
    prob = np.clip(0.3 * y + 0.7 * rng.random((n, labels)), 0, 1)
    return y, prob


def test_multilabel_metrics_equal_sklearn():
    y, prob = _multilabel()
    thresholds = np.array([0.3, 0.5, 0.6])
    m = multilabel_metrics(y, prob, thresholds, ["p", "q", "r"])
    pred = (prob >= thresholds).astype(int)
    assert m["loss"] == pytest.approx(skm.log_loss(y.ravel(), prob.ravel()))
    aucs = skm.roc_auc_score(y, prob, average=None)
    aps = skm.average_precision_score(y, prob, average=None)
    f1 = skm.f1_score(y, pred, average=None)
    precision = skm.precision_score(y, pred, average=None, zero_division=0)
    recall = skm.recall_score(y, pred, average=None)
    for j, name in enumerate("pqr"):
        got = m["per_label"][name]
        assert (got["roc_auc"], got["average_precision"], got["f1"]) == pytest.approx(
            (aucs[j], aps[j], f1[j])
        )
        assert (got["precision"], got["recall"]) == pytest.approx((precision[j], recall[j]))
    assert m["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, prob, average="macro"))
    assert m["macro_average_precision"] == pytest.approx(
        skm.average_precision_score(y, prob, average="macro")
    )
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_multilabel_undefined_labels_are_left_out_of_the_means():
    y, prob = _multilabel(seed=2)
    y[:, 1] = 0  # label q: no positives
    prob[:, 1] = 0.1  # and none predicted
    m = multilabel_metrics(y, prob, [0.5, 0.5, 0.5], ["p", "q", "r"])
    q = m["per_label"]["q"]
    assert q["roc_auc"] is None and q["average_precision"] is None and q["f1"] is None
    pred = (prob >= 0.5).astype(int)
    assert m["macro_roc_auc"] == pytest.approx(
        np.mean([skm.roc_auc_score(y[:, j], prob[:, j]) for j in (0, 2)])
    )
    assert m["macro_f1"] == pytest.approx(
        np.mean([skm.f1_score(y[:, j], pred[:, j]) for j in (0, 2)])
    )
    with pytest.raises(MedxferError, match="2 thresholds for 3 labels"):
        multilabel_metrics(y, prob, [0.5, 0.5], ["p", "q", "r"])


def test_scalar_metrics_list_every_scalar_of_each_task():
    y2, p2 = next(_cases(1))
    yc, pc = _multiclass()
    yl, pl = _multilabel()
    outputs = {
        "binary": task_metrics("binary", y2, p2, 0.5),
        "multiclass": task_metrics("multiclass", yc, pc, None, list("abcd")),
        "multilabel": task_metrics("multilabel", yl, pl, [0.5] * 3, list("pqr")),
    }
    for task, m in outputs.items():
        scalars = {k for k, v in m.items() if isinstance(v, float) or v is None}
        assert set(scalar_metrics(task)) == scalars - {"threshold"}
        assert set(HEADLINE[task]) <= set(scalar_metrics(task))
    assert outputs["binary"] == binary_metrics(y2, p2, 0.5)
    with pytest.raises(MedxferError, match="unknown task 'regression'"):
        scalar_metrics("regression")


# --- thresholds ------------------------------------------------------------------------------


def _brute_sensitivity(y, p, target):
    ok = [t for t in np.unique(p) if np.sum((p >= t) & (y == 1)) / np.sum(y == 1) >= target]
    return max(ok)


def _brute_youden(y, p):
    """Exact (rational) sensitivity + specificity - 1 at every distinct probability."""
    best, best_t = None, None
    for t in np.unique(p):  # increasing: ">=" keeps the highest of equal maxima
        pred = p >= t
        sens = Fraction(int(np.sum(pred & (y == 1))), int(np.sum(y == 1)))
        spec = Fraction(int(np.sum(~pred & (y == 0))), int(np.sum(y == 0)))
        if best is None or sens + spec - 1 >= best:
            best, best_t = sens + spec - 1, t
    return best_t


def test_sensitivity_threshold_keeps_intermediate_points():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert choose_threshold("sens=0.5", y, p) == 0.8
    assert choose_threshold("sens=1.0", y, p) == 0.6


def test_thresholds_equal_brute_force_with_ties():
    for y, p in _cases(200, seed=5):
        for target in (0.3, 0.5, 0.8, 0.95, 1.0):
            assert choose_threshold(f"sens={target}", y, p) == _brute_sensitivity(y, p, target)
        assert choose_threshold("youden", y, p) == _brute_youden(y, p)


def test_fixed_thresholds_and_errors():
    assert choose_threshold("0.3", None, None) == 0.3
    with pytest.raises(MedxferError, match="needs a validation split"):
        choose_threshold("youden", None, None)
    with pytest.raises(MedxferError, match="needs a validation split"):
        choose_threshold("sens=0.9", np.ones(4), np.linspace(0, 1, 4))


def test_multilabel_thresholds_per_label():
    y, prob = _multilabel(seed=4)
    got = choose_thresholds("sens=0.9", y, prob, ["p", "q", "r"])
    assert got.tolist() == [_brute_sensitivity(y[:, j], prob[:, j], 0.9) for j in range(3)]
    y[:, 2] = 1
    with pytest.raises(MedxferError, match="label r: --threshold youden"):
        choose_thresholds("youden", y, prob, ["p", "q", "r"])


def test_threshold_rules_are_checked_up_front():
    from medxfer.config import RunConfig

    for bad in ("abc", "sens=2", "1.5"):
        with pytest.raises(MedxferError, match="--threshold"):
            RunConfig(data="d", out="o", threshold=bad).validate()
    for good in ("0.5", "youden", "sens=0.9"):
        RunConfig(data="d", out="o", threshold=good).validate()


# --- calibration -----------------------------------------------------------------------------


def _brute_ece(correct, confidence, bins=15):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence >= lo) & ((confidence < hi) | (b == bins - 1))
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(confidence)


def test_ece_by_hand_and_brute_force():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.1, 0.6, 0.8])  # four single-image bins
    expected = (abs(1 - 0.9) + abs(0 - 0.1) + abs(1 - 0.6) + abs(1 - 0.8)) / 4
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    p = rng.random(500) ** 2
    y = (rng.random(500) < np.sqrt(p)).astype(int)  # under-confident: a clear gap
    assert expected_calibration_error(y, p) == pytest.approx(_brute_ece(y, p))
    assert expected_calibration_error(y, p) > 0.1


def test_top_label_ece_equals_brute_force():
    y, prob = _multiclass(n=400, k=5, seed=3)
    correct = (prob.argmax(1) == y).astype(float)
    assert top_label_ece(y, prob) == pytest.approx(_brute_ece(correct, prob.max(1)))


def _check_minimum(nll, logits, y, fitted):
    """``fitted`` beats a coarse grid of temperatures and both of its close neighbours."""
    best = nll(logits / fitted, y)
    assert best <= min(nll(logits / t, y) for t in np.exp(np.linspace(-2, 2, 41))) + 1e-12
    assert best <= min(nll(logits / (fitted * f), y) for f in (0.999, 1.001)) + 1e-12


def test_binary_temperature_is_the_minimum_and_recovers_truth():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 3000)
    labels = (rng.random(3000) < expit(true_logits)).astype(int)
    fitted = fit_temperature(true_logits * 3.0, labels)
    assert fitted == pytest.approx(3.0, rel=0.1)
    _check_minimum(lambda z, y: skm.log_loss(y, expit(z)), true_logits * 3.0, labels, fitted)


def test_multiclass_temperature_is_the_minimum_and_recovers_truth():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, (3000, 4))
    cdf = np.cumsum(softmax(true_logits, axis=1), axis=1)
    labels = np.minimum((rng.random((3000, 1)) > cdf).sum(axis=1), 3)  # sampled from softmax
    fitted = fit_temperature(true_logits / 2.0, labels)
    assert fitted == pytest.approx(0.5, rel=0.1)
    _check_minimum(
        lambda z, y: skm.log_loss(y, softmax(z, axis=1)), true_logits / 2.0, labels, fitted
    )


# --- bootstrap intervals ---------------------------------------------------------------------


def _scored(y, p, threshold=0.5):
    return lambda rows: {
        k: v
        for k, v in binary_metrics(y[rows], p[rows], threshold).items()
        if k in ("accuracy", "roc_auc", "loss", "f1")
    }


def test_cluster_resampling_takes_whole_patients():
    groups = np.array(["p3", "p1", "p3", "p2", "p1", "p3"])
    for rows in resample_rows(6, groups=groups, resamples=50, seed=0):
        picked = groups[rows]
        for g in np.unique(picked):  # every drawn patient brings all its rows, each draw
            assert np.sum(picked == g) % np.sum(groups == g) == 0
        assert set(rows[picked == "p3"]) <= {0, 2, 5}
    draws = [len(r) for r in resample_rows(6, resamples=20, seed=1)]
    assert draws == [6] * 20


def test_duplicated_patients_give_the_deduplicated_image_intervals():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.3 * y + 0.7 * rng.random(80), 0, 1)
    patient = np.repeat(np.arange(80), 3)  # three identical images per patient
    shuffle = rng.permutation(len(patient))
    patient = patient[shuffle]
    dup_y, dup_p = y[patient], p[patient]
    patients = bootstrap_intervals(_scored(dup_y, dup_p), 240, groups=patient, resamples=300)
    images = bootstrap_intervals(_scored(y, p), 80, resamples=300)
    assert patients["method"] == "patient-cluster bootstrap" and patients["clusters"] == 80
    assert images["method"] == "image bootstrap" and images["clusters"] == 80
    for k, interval in images["intervals"].items():
        assert patients["intervals"][k] == pytest.approx(interval, abs=1e-12)


def test_clustered_patients_widen_the_interval():
    """Ten near-identical images per patient carry little more than one: the patient-level
    interval must be markedly wider than the image-level one, which wrongly counts 400."""
    rng = np.random.default_rng(1)
    patient_y = rng.integers(0, 2, 40)
    patient_p = np.clip(0.25 * patient_y + 0.75 * rng.random(40), 0, 1)
    patient = np.repeat(np.arange(40), 10)
    y = patient_y[patient]
    p = np.clip(patient_p[patient] + rng.normal(0, 0.01, 400), 0, 1)
    clustered = bootstrap_intervals(_scored(y, p), 400, groups=patient, resamples=400)
    naive = bootstrap_intervals(_scored(y, p), 400, resamples=400)
    for k in ("accuracy", "roc_auc"):
        width = np.diff(clustered["intervals"][k])[0]
        assert width > 2 * np.diff(naive["intervals"][k])[0]


def test_interval_has_the_width_of_the_normal_approximation():
    """A [x, x] interval or one of the wrong scale fails: 95% accuracy interval ~ 2 x 1.96 SE."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1)
    point = binary_metrics(y, p)
    result = binary_intervals(y, p, 0.5, resamples=1000)
    lo, hi = result["intervals"]["accuracy"]
    acc = point["accuracy"]
    se = math.sqrt(acc * (1 - acc) / 500)
    assert lo < acc < hi
    assert hi - lo == pytest.approx(2 * norm.ppf(0.975) * se, rel=0.15)
    assert result["resamples"] == 1000 and result["level"] == 0.95 and "used" not in result


def test_interval_covers_the_true_auc():
    """Binormal scores (positives N(1, 1), negatives N(0, 1)): true AUC = Phi(1 / sqrt 2)."""
    truth = norm.cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(3)
    covered = 0
    for sim in range(200):
        y = np.repeat([0, 1], 40)
        s = rng.normal(0, 1, 80) + y
        lo, hi = bootstrap_intervals(
            lambda rows, y=y, s=s: {"auc": roc_auc(y[rows], s[rows])}, 80, resamples=120, seed=sim
        )["intervals"]["auc"]
        covered += lo <= truth <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_undefined_resamples_are_left_out_and_counted():
    y = np.zeros(30, dtype=int)
    y[0] = 1  # one positive: many resamples miss it, and their AUC is undefined
    p = np.linspace(0, 1, 30)
    result = binary_intervals(y, p, 0.5, resamples=200)
    missing = sum(0 not in rows for rows in resample_rows(30, resamples=200, seed=0))
    assert result["used"] == {"roc_auc": 200 - missing, "average_precision": 200 - missing}
    assert 0 < missing < 200 and result["intervals"]["roc_auc"] is not None


def test_bootstrap_input_errors():
    with pytest.raises(MedxferError, match="3 patient ids for 4 rows"):
        bootstrap_intervals(lambda rows: {}, 4, groups=[1, 2, 3])


# --- paired comparisons ----------------------------------------------------------------------


def _psi(x, z):
    return 1.0 if x > z else 0.5 if x == z else 0.0


def _paired_case(n=60, seed=0, gap=0.4):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    shared = rng.normal(0, 1, n)
    a = np.round(shared + 0.8 * y + rng.normal(0, 0.7, n), 1)  # rounding makes ties
    b = np.round(shared + (0.8 + gap) * y + rng.normal(0, 0.7, n), 1)
    return y, a, b


def test_structural_components_equal_brute_force():
    y, a, b = _paired_case(n=40)
    aucs, v10, v01 = structural_components(y, np.stack([a, b]))
    for r, s in enumerate((a, b)):
        x, z = s[y == 1], s[y == 0]
        assert v10[r] == pytest.approx([np.mean([_psi(xi, zj) for zj in z]) for xi in x])
        assert v01[r] == pytest.approx([np.mean([_psi(xi, zj) for xi in x]) for zj in z])
        assert aucs[r] == pytest.approx(skm.roc_auc_score(y, s))


def test_delong_covariance_equals_brute_force_formula():
    y, a, b = _paired_case(n=30, seed=1)
    scores = [a, b]
    aucs, cov = delong_covariance(y, np.stack(scores))
    x = [s[y == 1] for s in scores]
    z = [s[y == 0] for s in scores]
    m, n = len(x[0]), len(z[0])
    for r, s in itertools.product(range(2), repeat=2):
        s10 = sum(
            (np.mean([_psi(x[r][i], zj) for zj in z[r]]) - aucs[r])
            * (np.mean([_psi(x[s][i], zj) for zj in z[s]]) - aucs[s])
            for i in range(m)
        ) / (m - 1)
        s01 = sum(
            (np.mean([_psi(xi, z[r][j]) for xi in x[r]]) - aucs[r])
            * (np.mean([_psi(xi, z[s][j]) for xi in x[s]]) - aucs[s])
            for j in range(n)
        ) / (n - 1)
        assert cov[r, s] == pytest.approx(s10 / m + s01 / n)


def _permutation_p(y, a, b, rounds=2000, seed=0):
    rng = np.random.default_rng(seed)
    observed = abs(skm.roc_auc_score(y, b) - skm.roc_auc_score(y, a))
    hits = 0
    for _ in range(rounds):
        swap = rng.random(len(y)) < 0.5
        pa, pb = np.where(swap, b, a), np.where(swap, a, b)
        hits += abs(roc_auc(y, pb) - roc_auc(y, pa)) >= observed - 1e-12
    return hits / rounds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_p_value_agrees_with_a_permutation_test(seed):
    y, a, b = _paired_case(n=80, seed=seed, gap=0.35)
    result = delong_test(y, a, b)
    assert result["auc_a"] == pytest.approx(skm.roc_auc_score(y, a))
    assert result["auc_b"] == pytest.approx(skm.roc_auc_score(y, b))
    assert result["diff"] == pytest.approx(result["auc_b"] - result["auc_a"])
    assert result["z"] == pytest.approx(result["diff"] / result["se"])
    assert result["p_value"] == pytest.approx(_permutation_p(y, a, b), abs=0.05)


def test_delong_identical_models_and_errors():
    y, a, _ = _paired_case()
    same = delong_test(y, a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(MedxferError, match="needs both classes"):
        delong_test(np.ones(5), np.arange(5), np.arange(5))


def _brute_mcnemar(b, c):
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def test_mcnemar_exact_equals_binomial_sum():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(5, 80))
        a, b = rng.random(n) < 0.7, rng.random(n) < rng.uniform(0.5, 0.9)
        result = mcnemar_exact(a, b)
        assert (result["b"], result["c"]) == (int(np.sum(a & ~b)), int(np.sum(~a & b)))
        assert result["p_value"] == pytest.approx(_brute_mcnemar(result["b"], result["c"]))
    assert mcnemar_exact([True, False], [True, False]) == {"b": 0, "c": 0, "p_value": 1.0}


def test_paired_bootstrap_matches_delong_scale():
    y, a, b = _paired_case(n=200, seed=3, gap=0.3)
    pa, pb = expit(a), expit(b)
    result = paired_bootstrap(binary_differences(y, pa, pb), 200, resamples=1000)
    delong = delong_test(y, pa, pb)
    lo, hi = result["intervals"]["roc_auc"]
    assert lo < delong["diff"] < hi
    assert hi - lo == pytest.approx(2 * norm.ppf(0.975) * delong["se"], rel=0.25)
    assert result["p_values"]["roc_auc"] == pytest.approx(delong["p_value"], abs=0.05)
    same = paired_bootstrap(binary_differences(y, pa, pa), 200, resamples=100)
    assert same["intervals"]["roc_auc"] == [0.0, 0.0] and same["p_values"]["roc_auc"] == 1.0


def test_paired_bootstrap_resamples_patients():
    y, a, b = _paired_case(n=60, seed=4)
    patient = np.arange(60) // 2
    result = paired_bootstrap(
        binary_differences(y, expit(a), expit(b)), 60, groups=patient, resamples=50, seed=7
    )
    assert result["method"] == "patient-cluster bootstrap" and result["clusters"] == 30


def _brute_holm(p):
    m = len(p)
    less = [sum(q < pk for q in p) for pk in p]  # rank of each p-value (ties share the lowest)
    return [min(1.0, max((m - less[k]) * p[k] for k in range(m) if p[k] <= p[i])) for i in range(m)]


def test_holm_by_hand_and_brute_force():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    for _ in range(100):
        p = np.round(rng.random(int(rng.integers(1, 9))) ** 2, 2)  # ties and p near 1
        assert holm(p) == pytest.approx(_brute_holm(list(p)))
    with pytest.raises(MedxferError, match=r"p-values must lie in \[0, 1\]"):
        holm([0.2, 1.5])
