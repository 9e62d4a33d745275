"""``medxfer ensemble``: members' probabilities averaged by hand, the operating point found by
brute force on the averaged validation rows, metrics against scikit-learn, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from medxfer.cli import main

COMMON = ["--image-size", "32", "--epochs", "2", "--bootstrap", "0", "--quiet"]


@pytest.fixture(scope="module")
def members(small_kermany, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    runs = []
    for seed, mode in ((0, "transfer"), (1, "transfer"), (2, "scratch")):
        run = root / f"{mode}-s{seed}"
        args = ["train", "--data", str(small_kermany), "--out", str(run), "--mode", mode]
        assert main([*args, "--seed", str(seed), "--threshold", "youden", *COMMON]) == 0
        runs.append(run)
    return runs


def _read(run, split):
    frame = pd.read_csv(run / "predictions.csv")
    return frame[frame.split == split].set_index("file").sort_index()


@pytest.mark.integration
def test_ensemble_averages_members_and_chooses_on_validation(members, tmp_path):
    out = tmp_path / "ens"
    argv = ["ensemble", *map(str, members), "--out", str(out), "--bootstrap", "200"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    mine = {s: _read(out, s) for s in ("val", "test")}
    for split, frame in mine.items():
        hand = np.mean([_read(m, split).loc[frame.index].probability for m in members], axis=0)
        assert len(frame) > 0
        np.testing.assert_allclose(frame.probability, hand, rtol=0, atol=1e-12)
    # Youden's J by brute force on the averaged validation probabilities (highest on ties)
    val = mine["val"]
    y_val, p_val = (val.label == "PNEUMONIA").to_numpy(), val.probability.to_numpy()
    best = max(
        sorted(set(p_val), reverse=True),
        key=lambda t: (p_val[y_val] >= t).mean() - (p_val[~y_val] >= t).mean(),
    )
    assert metrics["threshold"] == pytest.approx(best)
    test = mine["test"]
    y = (test.label == "PNEUMONIA").to_numpy()
    assert metrics["test"]["roc_auc"] == pytest.approx(roc_auc_score(y, test.probability))
    accuracy = accuracy_score(y, test.probability >= metrics["threshold"])
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy)
    lo, hi = metrics["test"]["ci95"]["roc_auc"]
    assert lo <= metrics["test"]["roc_auc"] <= hi
    # the best member is chosen on validation AUC, and the comparison is against it
    val_auc = {
        str(m): json.loads((m / "metrics.json").read_text())["val"]["roc_auc"] for m in members
    }
    assert metrics["best_member"] == max(val_auc, key=val_auc.get)
    comparison = pd.read_csv(out / "comparison.csv").set_index("metric")
    best_test = json.loads(
        (members[0].parent / metrics["best_member"] / "metrics.json").read_text()
    )
    assert comparison.loc["roc_auc", "value_a"] == pytest.approx(best_test["test"]["roc_auc"])
    assert comparison.loc["roc_auc", "value_b"] == pytest.approx(metrics["test"]["roc_auc"])
    assert comparison.loc["roc_auc", "test"] == "DeLong"
    assert "Best member" in (out / "model_card.md").read_text()


@pytest.mark.integration
def test_ensemble_refuses_runs_that_do_not_match(members, small_kermany, tmp_path, capsys):
    other = tmp_path / "other"
    args = ["train", "--data", str(small_kermany), "--out", str(other), "--limit-per-class", "8"]
    args += ["--val-fraction", "0.25"]
    assert main([*args, "--threshold", "youden", *COMMON]) == 0
    out = tmp_path / "ens"
    assert main(["ensemble", str(members[0]), str(other), "--out", str(out)]) != 0
    assert "images differ from" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ens.*"))
    half = tmp_path / "half"
    half.mkdir()
    assert main(["ensemble", str(members[0]), str(half), "--out", str(out)]) != 0
    assert "not a finished run" in capsys.readouterr().err
    assert main(["ensemble", str(members[0]), "--out", str(out)]) != 0
    assert "at least two runs" in capsys.readouterr().err


@pytest.mark.integration
def test_fold_runs_ensemble_without_shared_validation_and_refusals(small_kermany, tmp_path, capsys):
    """Folds hold out disjoint validation sets: the 0.5 rule needs none; a run named twice
    and an --out that is a file are refused in one line."""
    folds = []
    for fold in (0, 1):
        run = tmp_path / f"f{fold}"
        args = ["train", "--data", str(small_kermany), "--out", str(run), "--folds", "3"]
        assert main([*args, "--fold", str(fold), *COMMON]) == 0
        folds.append(run)
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, folds), "--out", str(out), "--bootstrap", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"] is None and metrics["threshold"] == 0.5
    assert oct((out).stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert main(["ensemble", str(folds[0]), str(folds[0]), "--out", str(tmp_path / "x")]) == 2
    assert "is given twice" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["ensemble", *map(str, folds), "--out", str(tmp_path / "afile")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
