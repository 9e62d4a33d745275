"""Segmentation statistics against independent references: the set summary's intervals equal
a bootstrap written out here (images, or whole patients), the paired comparison of two runs
equals scipy's Wilcoxon test, a brute-force paired bootstrap and Holm's procedure; the
manifest's patient column; and predict going on past unreadable inputs on a real lung run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import wilcoxon

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.segmentation.data import load_segmentation
from medxfer.segmentation.metrics import METRICS, paired_segmentation, summarize
from tests.test_segmentation import (
    LUNG,
    _pair_folder,
    lung_manifest,  # noqa: F401  (a fixture that trained_run uses)
    needs_lung,
    trained_run,  # noqa: F401  (a fixture)
)

N = 40


def _rows(seed: int, n: int = N, shift: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dice = np.clip(rng.uniform(0.6, 0.95, n) + shift, 0, 1)
    hd95 = rng.uniform(1, 20, n)
    hd95[[3, 11]] = np.nan  # undefined: one mask empty
    return {
        "dice": dice,
        "iou": dice / (2 - dice),
        "pixel_accuracy": np.clip(rng.uniform(0.85, 0.99, n) + shift / 4, 0, 1),
        "hd95": hd95,
    }


def _brute_bootstrap(rows: dict, rows_of_draw, clusters: int, resamples: int, seed: int):
    """Percentile 95% intervals of the means, drawing ``clusters`` cluster indices per resample
    with ``default_rng(seed).integers`` (``resample_rows``' documented contract)."""
    rng = np.random.default_rng(seed)
    means = {k: [] for k in rows}
    for _ in range(resamples):
        picked = rows_of_draw(rng.integers(0, clusters, clusters))
        for k, v in rows.items():
            finite = v[picked][np.isfinite(v[picked])]
            if len(finite):
                means[k].append(finite.mean())
    return {k: [np.quantile(m, 0.025), np.quantile(m, 0.975)] for k, m in means.items()}


def test_summary_intervals_equal_a_brute_force_image_bootstrap():
    rows = _rows(0)
    summary = summarize(rows, resamples=300, seed=3)
    assert summary["images"] == N and summary["hd95_undefined"] == 2
    assert summary["dice"] == pytest.approx(rows["dice"].mean())
    assert summary["hd95"] == pytest.approx(np.nanmean(rows["hd95"]))
    want = _brute_bootstrap(rows, lambda picks: picks, N, 300, 3)
    for name in METRICS:
        np.testing.assert_allclose(summary["ci95"][name], want[name], rtol=1e-12)
    assert summary["interval_method"] == {
        "method": "image bootstrap",
        "clusters": N,
        "resamples": 300,
        "level": 0.95,
    }
    assert "ci95" not in summarize(rows, resamples=0)


def test_summary_with_patients_resamples_whole_patients():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 5, 15)  # 15 patients with 1 to 4 images each
    groups = np.repeat([f"p{i:02d}" for i in rng.permutation(15)], sizes)
    rows = _rows(2, n=len(groups))
    summary = summarize(rows, groups=groups, resamples=300, seed=4)
    ids = np.unique(groups)

    def rows_of(picks):
        return np.concatenate([np.flatnonzero(groups == ids[p]) for p in picks])

    want = _brute_bootstrap(rows, rows_of, len(ids), 300, 4)
    for name in METRICS:
        np.testing.assert_allclose(summary["ci95"][name], want[name], rtol=1e-12)
    assert summary["interval_method"]["method"] == "patient-cluster bootstrap"
    assert summary["interval_method"]["clusters"] == 15

    # four identical images per patient: the patients are the units, copies add nothing
    per_patient = {k: v[:20] for k, v in _rows(5).items()}
    copies = {k: np.repeat(v, 4) for k, v in per_patient.items()}
    patients = np.repeat([f"p{i:02d}" for i in range(20)], 4)
    by_patient = summarize(copies, groups=patients, resamples=500, seed=0)["ci95"]["dice"]
    np.testing.assert_allclose(
        by_patient, summarize(per_patient, resamples=500, seed=0)["ci95"]["dice"], rtol=1e-12
    )
    by_image = summarize(copies, resamples=500, seed=0)["ci95"]["dice"]
    assert by_image[1] - by_image[0] < 0.7 * (by_patient[1] - by_patient[0])  # about half


def _row(rows: list[dict], metric: str) -> dict:
    return next(r for r in rows if r["metric"] == metric)


def test_paired_comparison_matches_scipy_brute_force_and_holm():
    a, b = _rows(0), _rows(0, shift=0.03)
    b["hd95"] = _rows(9)["hd95"]
    b["hd95"][[5]] = np.nan  # a third image undefined in one run only
    result = paired_segmentation(a, b, resamples=400, seed=2)
    assert [r["metric"] for r in result] == list(METRICS)

    dice = _row(result, "dice")
    assert dice["primary"] and dice["test"].startswith("Wilcoxon")
    assert dice["p_value"] == pytest.approx(wilcoxon(b["dice"] - a["dice"]).pvalue, rel=1e-12)
    assert dice["p_adjusted"] == dice["p_value"] and dice["p_value"] < 0.01
    assert dice["diff"] == pytest.approx(np.mean(b["dice"] - a["dice"]))

    rng = np.random.default_rng(2)  # paired bootstrap of the mean difference, by hand
    both = np.isfinite(a["hd95"]) & np.isfinite(b["hd95"])
    draws = {k: [] for k in METRICS}
    for _ in range(400):
        picks = rng.integers(0, N, N)
        for k in METRICS:
            keep = picks[both[picks]] if k == "hd95" else picks
            draws[k].append(np.mean(b[k][keep] - a[k][keep]))
    for k in METRICS:
        d = np.asarray(draws[k])
        row = _row(result, k)
        np.testing.assert_allclose([row["ci_low"], row["ci_high"]], np.quantile(d, [0.025, 0.975]))
        if k != "dice":
            assert row["p_value"] == pytest.approx(
                min(1, 2 * min(1 + (d <= 0).sum(), 1 + (d >= 0).sum()) / (len(d) + 1))
            )
            assert row["test"] == "paired bootstrap"

    hd95 = _row(result, "hd95")
    assert hd95["value_a"] == pytest.approx(a["hd95"][both].mean()) and both.sum() == N - 3
    assert hd95["diff"] == pytest.approx(np.mean(b["hd95"][both] - a["hd95"][both]))
    assert f"{N - 3} of {N} images" in hd95["note"]

    family = [_row(result, k) for k in ("iou", "pixel_accuracy", "hd95")]
    p = [r["p_value"] for r in family]
    try:
        from statsmodels.stats.multitest import multipletests

        want = multipletests(p, method="holm")[1]
    except ImportError:  # Holm by hand: i-th smallest times (m - i), running maximum, cap 1
        order = np.argsort(p)
        stepped = np.minimum(
            1, np.maximum.accumulate([(3 - i) * p[j] for i, j in enumerate(order)])
        )
        want = np.empty(3)
        want[order] = stepped
    np.testing.assert_allclose([r["p_adjusted"] for r in family], want)


def test_paired_with_patients_tests_one_difference_per_patient():
    groups = np.repeat([f"p{i:02d}" for i in range(10)], 4)
    a, b = _rows(3), _rows(4)
    result = paired_segmentation(a, b, groups=groups, resamples=200, seed=0)
    dice = _row(result, "dice")
    per_patient = pd.Series(b["dice"] - a["dice"]).groupby(groups).mean()
    assert len(per_patient) == 10
    assert dice["p_value"] == pytest.approx(wilcoxon(per_patient.to_numpy()).pvalue, rel=1e-12)
    assert "patient" in dice["test"] and dice["interval"].startswith("patient-cluster")


def test_identical_runs_show_no_difference():
    a = _rows(6)
    for groups in (None, np.arange(N) // 2):
        for row in paired_segmentation(a, a, groups=groups, resamples=200, seed=1):
            assert row["diff"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0, row
            assert row["p_value"] == 1 and row["p_adjusted"] == 1, row


def test_paired_refuses_misaligned_runs():
    with pytest.raises(MedxferError, match="40 and 39 images") as info:
        paired_segmentation(_rows(0), _rows(1, n=39))
    assert "\n" not in str(info.value)
    with pytest.raises(MedxferError, match="3 patient ids for 40 images"):
        paired_segmentation(_rows(0), _rows(1), groups=["a", "b", "c"])


def test_manifest_patient_column(tmp_path):
    root = _pair_folder(tmp_path / "d")
    assert load_segmentation(root, 32).patients is None  # no patient column: images are units
    manifest = pd.DataFrame(
        {
            "path": [f"images/{n}.png" for n in "abcd"],
            "mask": [f"masks/{n}.png" for n in "abcd"],
            "split": ["train", "train", "val", "test"],
            "patient": ["P1", "P1", "", "P2"],
        }
    )
    manifest.to_csv(root / "m.csv", index=False)
    data = load_segmentation(root / "m.csv", 32)
    assert data.patients == ["P1", "P1", "file:images/c.png", "P2"]


@needs_lung
def test_predict_goes_on_past_unreadable_inputs(trained_run, tmp_path, capsys):  # noqa: F811
    good = [str(LUNG / p) for p in pd.read_csv(LUNG / "split.csv").query("split == 'test'").image]
    corrupt = tmp_path / "in" / "corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(Path(good[0]).read_bytes()[:300])  # a PNG cut short
    text = tmp_path / "in" / "notes.txt"
    text.write_text("not an image\n")
    inputs = [good[0], str(corrupt), str(text), good[1]]
    out = tmp_path / "out"
    assert main(["segment", "predict", str(trained_run), *inputs, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "wrote 2 masks" in captured.out and "2 failed" in captured.out
    assert f"{corrupt}: unreadable image" in captured.err and f"{text}: " in captured.err

    table = pd.read_csv(out / "masks.csv")
    assert list(table.columns) == ["file", "mask", "overlay", "error"]
    assert list(table.file) == inputs
    assert table.error.isna().tolist() == [True, False, False, True]
    assert table.loc[1:2, "mask"].isna().all() and table.loc[1:2, "overlay"].isna().all()
    assert table.error[1].startswith("unreadable image") and not table.error[1].startswith(
        str(corrupt)
    )
    # the readable inputs, before and after the bad ones, get the masks they get alone
    alone = tmp_path / "alone"
    assert (
        main(["segment", "predict", str(trained_run), good[0], good[1], "--out", str(alone)]) == 0
    )
    for name in (table["mask"][0], table["overlay"][3], table["mask"][3]):
        got, want = Image.open(out / name), Image.open(alone / name)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["masks.csv", *table["mask"].dropna(), *table["overlay"].dropna()]
    )
