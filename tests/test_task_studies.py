"""Segmentation and detection as study cells (the paper's Section 3.4 with the classification
study's machinery): one TOML, the runs, results.csv, the paired comparisons checked against
scipy on the runs' own per-image predictions, the report, and the presets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.study.compare import read_comparisons
from medxfer.study.execute import run_study
from medxfer.study.spec import load_study
from tests.test_detection import BCCD, bccd_csv  # noqa: F401 - fixture
from tests.test_segmentation import LUNG, lung_manifest  # noqa: F401 - fixture

needs_lung = pytest.mark.skipif(not LUNG.is_dir(), reason=f"{LUNG} not present")
needs_bccd = pytest.mark.skipif(not BCCD.is_dir(), reason=f"{BCCD} not present")


def _segmentation_study(path, manifest) -> str:
    path.write_text(
        f"""
[study]
name = "seg"
[base]
task = "segmentation"
data = "{manifest}"
image_size = 32
epochs = 1
batch_size = 8
bootstrap = 200
[grid]
mode = ["scratch", "transfer"]
seed = [0]
"""
    )
    return str(path)


@needs_lung
def test_segmentation_study_pairs_images_and_reports(lung_manifest, tmp_path):  # noqa: F811
    study = load_study(_segmentation_study(tmp_path / "seg.toml", lung_manifest))
    out = tmp_path / "study"
    run_study(study, out, log=lambda _: None)
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["mode"]) == ["scratch", "transfer"]
    assert set(results.task) == {"segmentation"}
    assert results.dice.between(0, 1).all() and (results.dice_ci_low <= results.dice).all()

    pairs = read_comparisons(out)
    assert set(pairs.metric) == {"dice", "iou", "pixel_accuracy", "hd95"}
    dice = pairs[pairs.metric == "dice"].iloc[0]
    assert (dice.a, dice.b) == ("scratch", "transfer") and bool(dice.primary)
    tables = {
        m: pd.read_csv(out / "runs" / cell / "predictions.csv").query("split == 'test'")
        for m, cell in zip(results["mode"], results.cell, strict=True)
    }
    a, b = tables["scratch"].set_index("file"), tables["transfer"].set_index("file")
    differences = (b.dice - a.dice.loc[b.index]).to_numpy()
    assert dice["diff"] == pytest.approx(differences.mean(), abs=1e-12)
    want = stats.wilcoxon(differences).pvalue if np.any(differences) else 1.0
    assert dice.p_value == pytest.approx(want, rel=1e-9)
    assert dice.ci_low <= dice["diff"] <= dice.ci_high

    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Segmentation: test Dice" in report
    assert "Transfer learning − Scratch" in report
    assert "medxfer segment train --data" in report
    assert (out / "figures" / "figure3_training_curves.png").stat().st_size > 0

    # the same study folder with another option: refused, not reported as finished
    changed = load_study(_segmentation_study(tmp_path / "seg.toml", lung_manifest), ["bn=adapt"])
    with pytest.raises(MedxferError, match=r"holds a run with other settings \(bn\)"):
        run_study(changed, out, log=lambda _: None)


def test_presets_for_the_two_tasks_load():
    seg, det = load_study("segmentation"), load_study("detection")
    assert [c.options["mode"] for c in seg.cells()] == ["scratch", "transfer", "finetune"]
    assert {c.options["task"] for c in seg.cells() + det.cells()} == {"segmentation", "detection"}
    assert det.base["lr"] == 0.005


def test_a_study_refuses_options_of_another_task(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[base]\ntask = "segmentation"\ndata = "x"\nviews = 2\n[grid]\nseed = [0]\n')
    with pytest.raises(MedxferError, match="'views' is not a segmentation run option"):
        load_study(str(path))
    path.write_text('[base]\ndata = "x"\n[grid]\ntask = ["binary", "detection"]\n')
    with pytest.raises(MedxferError, match="one study trains one kind of run"):
        load_study(str(path))


@needs_bccd
def test_detection_study_recomputes_map_from_the_box_tables(bccd_csv, tmp_path):  # noqa: F811
    path = tmp_path / "det.toml"
    path.write_text(
        f"""
[base]
task = "detection"
data = "{bccd_csv}"
image_size = 128
epochs = 1
bootstrap = 200
[grid]
mode = ["transfer", "finetune"]
seed = [0]
"""
    )
    out = tmp_path / "study"
    run_study(load_study(str(path)), out, log=lambda _: None)
    results = pd.read_csv(out / "results.csv").set_index("mode")
    assert set(results.task) == {"detection"}
    pairs = read_comparisons(out)
    primary = pairs[pairs.metric == "map_50"].iloc[0]
    assert (primary.a, primary.b) == ("transfer", "finetune") and bool(primary.primary)
    # our mAP from predictions.csv against torchmetrics' in each run's metrics.json
    for side in ("a", "b"):
        cell = primary[f"cell_{side}"]
        test = json.loads((out / "runs" / cell / "metrics.json").read_text())["test"]
        assert primary[f"value_{side}"] == pytest.approx(test["map_50"], abs=1e-6)
        assert set(test["ci95"]) == {"map_50", "map"}
    assert primary["diff"] == pytest.approx(
        results.map_50["finetune"] - results.map_50["transfer"], abs=1e-6
    )
    assert pairs.test.dropna().eq("paired bootstrap").all()


def test_no_run_option_is_named_like_a_metric_column():
    """results.csv holds every kind of run's options beside every task's metrics: an option
    named like a metric (segmentation's loss choice was once ``loss``) would split replicates."""
    from medxfer.evaluation.metrics import HEADLINE, TASKS, scalar_metrics
    from medxfer.study.table import EXPERIMENT

    metrics = {m for names in HEADLINE.values() for m in names}
    metrics |= {m for task in TASKS for m in scalar_metrics(task)}
    assert not metrics & set(EXPERIMENT)


@needs_lung
def test_python_api_trains_a_segmentation_run(lung_manifest, tmp_path):  # noqa: F811
    import medxfer

    out = tmp_path / "run"
    folder = medxfer.train(
        lung_manifest, out, task="segmentation", image_size=32, epochs=1, bootstrap=0, quiet=True
    )
    assert folder.is_complete() and folder.family() == "segmentation"
    assert folder.read_metrics()["task"] == "segmentation"
    assert folder.read_options()["criterion"] == "ce+dice"
    with pytest.raises(MedxferError, match="holds a run with other settings \\(epochs\\)"):
        medxfer.train(lung_manifest, out, task="segmentation", image_size=32, epochs=2, bootstrap=0)
