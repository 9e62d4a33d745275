"""The run-folder rules that segmentation and detection share with classification
(``medxfer.training.trainer``): --overwrite only once the new run's options and data are good and
the folder's lock is held, the one command shape, and classification's verbs on their runs."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from medxfer.cli import _task_family_alias, main
from medxfer.detection.data import load_detection_data
from medxfer.errors import MedxferError
from medxfer.locking import run_folder_lock
from medxfer.storage.folder import RunFolder
from tests.test_detection import bccd_csv, needs_bccd  # noqa: F401 - fixture
from tests.test_segmentation import LUNG, lung_manifest, trained_run  # noqa: F401 - fixtures

needs_lung = pytest.mark.skipif(not LUNG.is_dir(), reason=f"{LUNG} not present")


@pytest.fixture()
def finished_copy(trained_run, tmp_path):  # noqa: F811
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _argv(manifest, out, *extra):
    return ["segment", "train", "--data", str(manifest), "--out", str(out), "--quiet", *extra]


@needs_lung
def test_overwrite_with_a_bad_option_or_bad_data_keeps_the_finished_run(
    finished_copy,
    lung_manifest,  # noqa: F811
    tmp_path,
    capsys,
):
    before = (finished_copy / "metrics.json").read_text()
    assert main(_argv(lung_manifest, finished_copy, "--select", "bogus", "--overwrite")) == 2
    assert main(_argv(tmp_path / "missing.csv", finished_copy, "--overwrite")) == 2
    assert "missing.csv: not found" in capsys.readouterr().err
    assert (finished_copy / "metrics.json").read_text() == before


@needs_lung
def test_overwrite_waits_for_the_lock(finished_copy, lung_manifest, capsys):  # noqa: F811
    with run_folder_lock(finished_copy):  # another process training into it
        code = main(_argv(lung_manifest, finished_copy, "--image-size", "32", "--overwrite"))
    assert code == 2 and "another medxfer process" in capsys.readouterr().err
    assert RunFolder(finished_copy).is_complete()


def test_train_task_alias_keeps_global_options_in_front():
    argv = ["--allocator", "default", "train", "--task", "segmentation", "--data", "d"]
    assert _task_family_alias(argv) == [
        "--allocator",
        "default",
        "segment",
        "train",
        "--data",
        "d",
    ]
    assert _task_family_alias(["train", "--data", "d", "--task=detection"]) == [
        "detect",
        "train",
        "--data",
        "d",
    ]
    assert _task_family_alias(["train", "--task", "binary"]) == ["train", "--task", "binary"]


@needs_lung
def test_classification_verbs_name_the_command_a_segmentation_run_takes(
    trained_run,  # noqa: F811
    capsys,
):
    image = LUNG / "images" / "CHNCXR_0001_0.png"
    for run in (trained_run, trained_run / "model.pt"):  # a folder, or its model file alone
        assert main(["predict", str(run), str(image)]) == 2
        assert "a segmentation run; use `medxfer segment predict|export`" in capsys.readouterr().err
    # and the other family's commands refuse it too, before writing anything
    out = trained_run.parent / "boxes"
    assert main(["detect", "predict", str(trained_run), str(image), "--out", str(out)]) == 2
    assert "a segmentation run; use `medxfer segment" in capsys.readouterr().err
    assert main(["detect", "export", str(trained_run), "--out", str(out / "m.onnx")]) == 2
    assert "a segmentation run" in capsys.readouterr().err and not out.exists()
    # training another family's run into its folder names what the folder holds
    assert main(["train", "--data", str(LUNG), "--out", str(trained_run), "--epochs", "1"]) == 2
    assert "holds a segmentation run, not a classification one" in capsys.readouterr().err


@needs_bccd
def test_detection_csv_refuses_blank_labels_and_images_in_two_splits(
    bccd_csv,  # noqa: F811
    tmp_path,
):
    frame = pd.read_csv(bccd_csv)
    blank = frame.copy()
    blank.loc[3, "label"] = None
    blank.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(MedxferError, match=r"blank\.csv: line 5: box with no label"):
        load_detection_data(tmp_path / "blank.csv")
    mixed = frame.copy()
    first = mixed.path[mixed.split == "train"].iloc[0]
    mixed.loc[len(mixed)] = {**mixed.iloc[0].to_dict(), "path": first, "split": "test"}
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(MedxferError, match="is listed in more than one split"):
        load_detection_data(tmp_path / "mixed.csv")


@needs_lung
def test_segmentation_bn_adapt_takes_the_training_images_statistics(
    lung_manifest,  # noqa: F811
    tmp_path,
):
    """The first frozen BatchNorm's running mean and variance become those of its input over
    every pixel of the clean training images (computed here in float64 with the frozen conv)."""
    import torch

    from medxfer.device import to_input
    from medxfer.segmentation.data import load_segmentation
    from medxfer.segmentation.run import load_segmentation_run

    out = tmp_path / "adapt"
    argv = _argv(lung_manifest, out, "--image-size", "32", "--epochs", "1", "--bn", "adapt")
    assert main([*argv, "--bootstrap", "0"]) == 0
    model, _ = load_segmentation_run(out)
    modules = dict(model.encoder.named_modules())
    conv, norm = modules["features.0.0"], modules["features.0.1"]
    data = load_segmentation(lung_manifest, 32)
    with torch.no_grad():
        x = conv(model.prep(to_input(data.images[data.splits["train"]], "cpu"))).double()
    mean = x.mean(dim=(0, 2, 3))
    variance = x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var.double(), variance, rtol=1e-3, atol=1e-5)


def test_bootstrap_p_value_is_never_below_what_its_resamples_can_show():
    import numpy as np

    from medxfer.evaluation.paired import paired_bootstrap

    values = np.linspace(1.0, 2.0, 30)  # every resample's mean difference is positive

    def score(rows):
        return {"d": float(values[rows].mean())}

    result = paired_bootstrap(score, 30, resamples=100, seed=0)
    assert result["p_values"]["d"] == pytest.approx(2 / 101)


@needs_lung
def test_segment_predict_refuses_an_output_folder_among_its_inputs(
    trained_run,  # noqa: F811
    tmp_path,
    capsys,
):
    images = tmp_path / "scans"
    images.mkdir()
    shutil.copy(LUNG / "images" / "CHNCXR_0001_0.png", images / "a.png")
    for out in (images, images / "masks"):
        assert main(["segment", "predict", str(trained_run), str(images), "--out", str(out)]) == 2
        assert "among the inputs" in capsys.readouterr().err
    assert sorted(p.name for p in images.rglob("*")) == ["a.png"]
