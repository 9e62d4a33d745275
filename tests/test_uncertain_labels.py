"""Unknown label entries (U-Ignore, ``--missing ignore``): NaN targets are masked out of the
loss, the class weights, the metrics and the thresholds. Numbers are checked against a hand
computation with numpy and against scikit-learn on the known entries only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from medxfer.evaluation.metrics import task_metrics
from medxfer.evaluation.thresholds import choose_threshold
from medxfer.tasks import make_task

LABELS = ("A", "B", "C")


def _targets(rng, n: int = 40) -> np.ndarray:
    y = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
    y[rng.random(y.shape) < 0.3] = np.nan
    y[:2] = [[1, 0, np.nan], [0, 1, np.nan]]  # both values of every label stay known
    y[2:4, 2] = [0, 1]
    return y


def _hand_bce(logit: float, y: float) -> float:
    p = 1.0 / (1.0 + np.exp(-logit))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_masked_loss_and_class_weights_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    y = _targets(rng)
    logits = rng.normal(size=y.shape).astype(np.float32)
    task = make_task("multilabel", LABELS)
    weights = task.class_weights(torch.from_numpy(y)).numpy()
    loss = task.loss(torch.from_numpy(logits), torch.from_numpy(y), torch.from_numpy(weights))
    plain = task.loss(torch.from_numpy(logits), torch.from_numpy(y))

    expected_w = np.empty((2, len(LABELS)))
    total = weighted = 0.0
    entries = 0
    for j in range(len(LABELS)):
        column = y[:, j][~np.isnan(y[:, j])]
        n, pos = len(column), column.sum()
        expected_w[:, j] = n / (2 * (n - pos)), n / (2 * pos)
    for i in range(len(y)):
        for j in range(len(LABELS)):
            if np.isnan(y[i, j]):
                continue
            bce = _hand_bce(float(logits[i, j]), float(y[i, j]))
            total += bce
            weighted += bce * expected_w[int(y[i, j]), j]
            entries += 1
    np.testing.assert_allclose(weights, expected_w, rtol=1e-6)
    assert entries < y.size  # some entries really were unknown
    assert float(plain) == pytest.approx(total / entries, rel=1e-5)
    assert float(loss) == pytest.approx(weighted / entries, rel=1e-5)
    # the gradient of an unknown entry is zero
    z = torch.from_numpy(logits).requires_grad_()
    task.loss(z, torch.from_numpy(y)).backward()
    assert (z.grad[torch.from_numpy(np.isnan(y))] == 0).all()
    assert (z.grad[torch.from_numpy(~np.isnan(y))] != 0).all()


def test_training_accuracy_counts_known_entries():
    task = make_task("multilabel", LABELS)
    y = torch.tensor([[1.0, np.nan, 0.0], [np.nan, np.nan, 1.0]])
    logits = torch.tensor([[2.0, 5.0, 1.0], [-1.0, -1.0, 3.0]])  # 2 of the 3 known are right
    assert int(task.correct(logits, y)) == 2
    assert float(task.decisions_per_row(y)) == pytest.approx(3 / 2)


def test_per_label_metrics_and_thresholds_use_known_entries_only():
    rng = np.random.default_rng(1)
    y = _targets(rng, n=60)
    prob = np.clip(0.3 * np.nan_to_num(y) + 0.7 * rng.random(y.shape), 0, 1)
    cuts = np.array([0.4, 0.5, 0.6])
    metrics = task_metrics("multilabel", y, prob, cuts, LABELS)
    known = ~np.isnan(y)
    aucs = []
    for j, name in enumerate(LABELS):
        yk, pk = y[known[:, j], j], prob[known[:, j], j]
        per = metrics["per_label"][name]
        assert per["roc_auc"] == pytest.approx(roc_auc_score(yk, pk), abs=1e-12)
        assert per["average_precision"] == pytest.approx(average_precision_score(yk, pk))
        assert per["support"] == int(yk.sum())
        aucs.append(roc_auc_score(yk, pk))
        # Youden's J on the known rows only: brute force over every candidate threshold
        best = max(
            sorted(set(pk), reverse=True),
            key=lambda t: (pk[yk == 1] >= t).mean() - (pk[yk == 0] >= t).mean(),
        )
        assert choose_threshold("youden", y[:, j], prob[:, j]) == pytest.approx(best)
    assert metrics["macro_roc_auc"] == pytest.approx(np.mean(aucs))
    clipped = np.clip(prob[known], 1e-7, 1 - 1e-7)  # as the metrics clip
    hand = -np.mean(y[known] * np.log(clipped) + (1 - y[known]) * np.log(1 - clipped))
    assert metrics["loss"] == pytest.approx(hand, rel=1e-9)


def _manifest(tmp_path, header: str, rows: list[str]):
    from tests.conftest import KERMANY

    image = next((KERMANY / "train" / "NORMAL").iterdir())
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + "\n".join(f"{image},{r}" for r in rows) + "\n")
    return path


def test_a_manifest_unknown_column_becomes_nan_targets_and_is_checked(tmp_path):
    from medxfer.data.sources import open_dataset
    from medxfer.data.tasks import target_array
    from medxfer.errors import MedxferError

    rows = ["A,train,,B", "A|B,train,,", ",test,,A|B"]
    imageset = open_dataset(_manifest(tmp_path, "path,labels,split,patient,unknown", rows))
    assert imageset.classes == ["A", "B"]
    targets = target_array(imageset.records, "multilabel", imageset.classes)
    np.testing.assert_array_equal(targets, [[1, np.nan], [1, 1], [np.nan, np.nan]])
    both = _manifest(tmp_path, "path,labels,split,unknown", ["A,train,A"])
    with pytest.raises(MedxferError, match=r"m\.csv:2: A is both a label and unknown"):
        open_dataset(both)
    single = _manifest(tmp_path, "path,label,split,unknown", ["A,train,B"])
    with pytest.raises(MedxferError, match=r"m\.csv:2: an unknown column needs a multi-label"):
        open_dataset(single)


def test_no_known_entry_scores_nothing_and_raises_nothing():
    """A bootstrap resample may hold only unknown entries: its metrics are None, not an error;
    a label without known entries has no precision or recall either."""
    y = np.array([[np.nan, 1.0], [np.nan, 0.0]])
    prob = np.array([[0.2, 0.9], [0.7, 0.1]])
    metrics = task_metrics("multilabel", y, prob, np.array([0.5, 0.5]), LABELS[:2])
    assert metrics["per_label"]["A"] == {
        "roc_auc": None,
        "average_precision": None,
        "f1": None,
        "precision": None,
        "recall": None,
        "threshold": 0.5,
        "support": 0,
    }
    assert metrics["per_label"]["B"]["roc_auc"] == 1.0
    nothing = task_metrics("multilabel", np.full((2, 2), np.nan), prob, None, LABELS[:2])
    assert nothing["loss"] is None and nothing["macro_roc_auc"] is None


def _split_manifest(tmp_path, val_unknown: str):
    from tests.conftest import KERMANY

    rows = ["path,labels,split,patient,unknown"]
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((KERMANY / ("test" if split == "test" else "train") / cls).iterdir())
            for i, f in enumerate(files[:n] if split != "val" else files[-n:]):
                labels = "|".join(["A"] * (cls == "PNEUMONIA") + ["B"] * (i % 2))
                unknown = val_unknown if split == "val" else ""
                if unknown:
                    labels = "|".join(n for n in labels.split("|") if n not in unknown.split("|"))
                rows.append(f"{f},{labels},{split},{split}{cls}{i},{unknown}")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    "val_unknown, extra, message",
    [
        ("B", ["--threshold", "youden"], "label B has 0 known validation entries, not both"),
        ("A|B", [], "every label entry of the val split is unknown"),
    ],
)
def test_validation_without_known_entries_is_refused_before_writing(
    tmp_path, capsys, val_unknown, extra, message
):
    from medxfer.cli import main

    data = _split_manifest(tmp_path, val_unknown)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--val-fraction", "0"]
    assert main([*args, "--image-size", "32", "--epochs", "1", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_label_that_is_no_label_is_refused(tmp_path):
    from medxfer.data.sources import open_dataset
    from medxfer.errors import MedxferError

    typo = _manifest(tmp_path, "path,labels,split,unknown", ["A,train,Bogus", "A,test,"])
    with pytest.raises(MedxferError, match="unknown label 'Bogus' is never a label"):
        open_dataset(typo)
