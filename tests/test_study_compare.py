"""Paired comparisons in studies (comparisons.csv, the report) and grouping by experiment,
checked against independent recomputations from the runs' own files."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, norm, t
from sklearn.metrics import accuracy_score, roc_auc_score

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.evaluation.metrics import HEADLINE
from medxfer.study.compare import write_comparisons
from medxfer.study.spec import load_study

pytestmark = pytest.mark.integration


def study_file(path, data, *, grid: str, base: str = "", meta: str = ""):
    path.write_text(
        f"""
[study]
name = "tiny"
{meta}

[base]
data = "{data}"
arch = "mobilenet_v2"
epochs = 1
image_size = 64
limit_per_class = 12
lr = 1e-3
{base}

[grid]
{grid}
"""
    )
    return path


@pytest.fixture(scope="module")
def paired_study(small_kermany, tmp_path_factory):
    """mobilenet_v2 scratch vs transfer x 2 seeds on a tiny real Kermany subset."""
    root = tmp_path_factory.mktemp("paired")
    toml = study_file(
        root / "s.toml",
        small_kermany,
        base="bootstrap = 200",
        grid='mode = ["scratch", "transfer"]\nseed = [0, 1]',
    )
    assert main(["study", "run", str(toml), "--out", str(root / "study")]) == 0
    return root / "study"


def read_test_rows(run):
    frame = pd.read_csv(run / "predictions.csv")
    return frame[frame.split == "test"].reset_index(drop=True)


def delong_brute_force(y, a, b) -> float:
    """DeLong's p-value from the O(m n) pairwise definition of the structural components."""
    comps = []
    for s in (a, b):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(1), psi.mean(0)))
    s10 = np.cov([comps[0][0], comps[1][0]])
    s01 = np.cov([comps[0][1], comps[1][1]])
    m, n = len(comps[0][0]), len(comps[0][1])
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = roc_auc_score(y, b) - roc_auc_score(y, a)
    return float(2 * norm.sf(abs(diff / np.sqrt(var))))


def holm_brute_force(p):
    order = np.argsort(p)
    out, running = np.empty(len(p)), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[j]))
        out[j] = running
    return out


def test_comparisons_match_independent_recomputation(paired_study):
    table = pd.read_csv(paired_study / "comparisons.csv")
    metrics = HEADLINE["binary"]
    assert len(table) == 3 * len(metrics)  # seed 0, seed 1, pooled
    assert set(table.replicate) == {"seed=0", "seed=1", "pooled"}
    assert set(zip(table.option, table.a, table.b, strict=True)) == {
        ("mode", "scratch", "transfer")
    }
    runs = paired_study / "runs"
    for seed in (0, 1):
        rows = table[table.replicate == f"seed={seed}"].set_index("metric")
        a = read_test_rows(runs / f"scratch-s{seed}")
        b = read_test_rows(runs / f"transfer-s{seed}")
        b = b.set_index("file").loc[a.file].reset_index()
        y = (a.label == "PNEUMONIA").to_numpy(int)
        pa, pb = a.probability.to_numpy(), b.probability.to_numpy()
        auc = rows.loc["roc_auc"]
        assert auc.value_a == pytest.approx(roc_auc_score(y, pa))
        assert auc.value_b == pytest.approx(roc_auc_score(y, pb))
        assert auc["diff"] == pytest.approx(roc_auc_score(y, pb) - roc_auc_score(y, pa))
        assert auc.p_value == pytest.approx(delong_brute_force(y, pa, pb), rel=1e-9)
        assert auc.test == "DeLong" and auc.primary and auc.p_adjusted == auc.p_value
        assert auc.ci_low <= auc["diff"] <= auc.ci_high
        cuts = [
            json.loads((runs / f"{m}-s{seed}/metrics.json").read_text())["threshold"]
            for m in ("scratch", "transfer")
        ]
        correct_a, correct_b = (pa >= cuts[0]) == y, (pb >= cuts[1]) == y
        only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
        expected = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        acc = rows.loc["accuracy"]
        assert acc.test == "exact McNemar" and acc.p_value == pytest.approx(expected)
        assert acc.value_b == pytest.approx(accuracy_score(y, pb >= cuts[1]))
        family = rows[~rows.primary]
        assert len(family) == len(metrics) - 1
        assert family.p_adjusted.to_numpy() == pytest.approx(
            holm_brute_force(family.p_value.to_numpy())
        )
        assert family.interval.str.contains("patient-cluster bootstrap").all()
    pooled = table[table.replicate == "pooled"].set_index("metric").loc["roc_auc"]
    diffs = table[(table.metric == "roc_auc") & (table.replicate != "pooled")]["diff"].to_numpy()
    assert pooled["diff"] == pytest.approx(diffs.mean())
    half = t.ppf(0.975, 1) * diffs.std(ddof=1) / np.sqrt(2)
    assert pooled.ci_low == pytest.approx(diffs.mean() - half)
    assert pooled.ci_high == pytest.approx(diffs.mean() + half)
    assert "t-test over 2 replicates" in pooled.test


def test_report_shows_difference_interval_and_p(paired_study):
    assert main(["report", str(paired_study)]) == 0
    report = (paired_study / "report.md").read_text()
    assert "**" not in report  # no bold-the-larger-mean any more
    table = pd.read_csv(paired_study / "comparisons.csv")
    pooled = table[table.replicate == "pooled"].set_index("metric").loc["roc_auc"]
    p = "< 0.001" if pooled.p_value < 0.001 else f"{pooled.p_value:.3f}"
    line = (
        f"| Transfer learning − Scratch |  | pooled | roc_auc (primary) | {pooled['diff']:+.3f} | "
        f"[{pooled.ci_low:+.3f}, {pooled.ci_high:+.3f}] | {p} |"
    )
    assert line in report
    summary = pd.read_csv(paired_study / "summary.csv").set_index("mode")
    acc = summary.loc["transfer"]
    cell = f"{acc.accuracy_mean * 100:.1f} ± {acc.accuracy_sd * 100:.1f} (90.9, "
    assert "| mobilenet_v2 | Transfer learning | 2 | " in report and cell in report
    html = (paired_study / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "roc_auc (primary)" in html


def test_pair_with_other_test_images_is_refused(paired_study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(paired_study, copy)
    run = copy / "runs" / "transfer-s1"
    predictions = pd.read_csv(run / "predictions.csv")
    dropped = predictions[predictions.split == "test"].file.iloc[0]
    predictions[predictions.file != dropped].to_csv(run / "predictions.csv", index=False)
    table = pd.read_csv(write_comparisons(copy))
    refused = table[table.replicate == "seed=1"]
    assert len(refused) == 1 and refused.metric.isna().all()
    assert "not the same test set" in refused.note.iloc[0] and dropped in refused.note.iloc[0]
    assert (table.replicate == "seed=0").sum() == len(HEADLINE["binary"])
    assert "pooled" not in set(table.replicate)  # one replicate left: nothing to pool


def test_bn_is_never_averaged_and_folds_are_replicates(small_kermany, tmp_path):
    toml = study_file(
        tmp_path / "s.toml",
        small_kermany,
        meta='compare = ["bn"]',
        base='mode = "transfer"\nfolds = 2\nbootstrap = 20',
        grid='bn = ["frozen", "adapt"]\nfold = [0, 1]',
    )
    out = tmp_path / "study"
    assert main(["study", "run", str(toml), "--out", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("bn")
    assert sorted(summary.index) == ["adapt", "frozen"]
    assert (summary.replicates == 2).all() and (summary.folds == "0 1").all()
    for bn in ("frozen", "adapt"):
        losses = [
            json.loads((out / "runs" / f"bn={bn}-fold={f}" / "metrics.json").read_text())["test"][
                "loss"
            ]
            for f in (0, 1)
        ]
        assert summary.loc[bn, "loss_mean"] == pytest.approx(np.mean(losses))
        assert summary.loc[bn, "loss_sd"] == pytest.approx(np.std(losses, ddof=1))
    table = pd.read_csv(out / "comparisons.csv")
    assert set(zip(table.option, table.a, table.b, strict=True)) == {("bn", "adapt", "frozen")}
    assert set(table.replicate) == {"seed=0 fold=0", "seed=0 fold=1", "pooled"}
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| Model | Setting | Method | n |" in report
    assert "| mobilenet_v2 | bn=frozen | Transfer learning | 2 |" in report
    assert "| mobilenet_v2 | bn=adapt | Transfer learning | 2 |" in report
    assert "| bn=frozen − bn=adapt | arch=mobilenet_v2 |" not in report  # arch does not vary
    assert "| bn=frozen − bn=adapt |  | pooled | roc_auc (primary) |" in report


def test_compare_names_experiment_options_only(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[study]\ncompare = ["seed"]\n[base]\ndata = "x"\n[grid]\nmode = ["scratch"]\n')
    with pytest.raises(MedxferError, match=r"study\.compare 'seed'"):
        load_study(str(path))
    path.write_text('[study]\ncompare = ["lr"]\n[base]\ndata = "x"\n[grid]\nlr = [1e-3, 1e-4]\n')
    assert load_study(str(path)).compare == ["lr"]


def test_every_experiment_is_paired_with_the_baseline(small_kermany, tmp_path):
    toml = study_file(
        tmp_path / "s.toml",
        small_kermany,
        meta='compare = ["head"]\n[study.baseline]\nhead = "paper"\ntta = 1',
        base='mode = "transfer"\nbootstrap = 50',
        grid='head = ["paper", "logreg"]\ntta = [1, 2]\nseed = [0]',
    )
    out = tmp_path / "study"
    assert main(["study", "run", str(toml), "--out", str(out)]) == 0
    table = pd.read_csv(out / "comparisons.csv")
    assert set(zip(table.option, table.a, table.b, strict=True)) == {
        ("head", "logreg", "paper"),  # the one-option pairs of compare, at tta 1 and 2
        ("baseline", "head=paper, tta=1", "head=logreg, tta=2"),
        ("baseline", "tta=1", "tta=2"),  # tta is not compared, but it is the baseline's
    }
    assert (table.option == "head").sum() == 2 * len(HEADLINE["binary"])
    row = table[(table.b == "head=logreg, tta=2") & (table.metric == "roc_auc")].iloc[0]
    a = read_test_rows(out / "runs" / "head=paper-tta=1-s0")
    b = read_test_rows(out / "runs" / "head=logreg-tta=2-s0").set_index("file").loc[a.file]
    y = (a.label == "PNEUMONIA").to_numpy(int)
    pa, pb = a.probability.to_numpy(), b.probability.to_numpy()
    assert row["diff"] == pytest.approx(roc_auc_score(y, pb) - roc_auc_score(y, pa))
    assert row.p_value == pytest.approx(delong_brute_force(y, pa, pb), rel=1e-9)
    assert row.cell_a == "head=paper-tta=1-s0" and row.cell_b == "head=logreg-tta=2-s0"
    assert json.loads((out / "study.json").read_text())["baseline"] == {"head": "paper", "tta": 1}
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| head=logreg, tta=2 − baseline head=paper, tta=1 |" in report
