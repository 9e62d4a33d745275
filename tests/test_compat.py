"""Run folders of the previous version keep working under the one trainer and the one model
file: an interrupted classification run whose checkpoint has the old layout resumes to the
uninterrupted run's numbers, and segmentation and detection model files of the first layout
load through ``medxfer.load`` with their weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import medxfer
from medxfer.classification.run import train
from medxfer.config import RunConfig
from medxfer.storage.folder import RunFolder
from medxfer.storage.model_file import read_model_file

pytestmark = pytest.mark.integration


def _old_checkpoint(path) -> None:
    """Rewrite a checkpoint in the previous version's classification layout: optimizer and
    generators inside ``state``, the selected weights as ``best_state``, lower-is-better
    ``best_score``, no ``seconds``."""
    saved = torch.load(path, weights_only=False)
    state = saved["state"]
    old = {
        "epoch": state["epoch"],
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "best_score": -state["best_score"],
        "best_state": state["best_model"],
        "optimizer": saved["optimizer"],
        "generators": saved["random"],
    }
    torch.save({"state": old, "model": saved["model"]}, path)


def test_a_checkpoint_of_the_previous_layout_resumes_to_the_same_result(small_kermany, tmp_path):
    common = dict(data=str(small_kermany), image_size=64, epochs=3, bootstrap=0)
    quiet = dict(progress=False, log=lambda _: None)
    whole = train(RunConfig(out=str(tmp_path / "whole"), **common), **quiet)

    def stop_at_epoch_2(line: str) -> None:
        if line.startswith("epoch   2"):
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(RunConfig(out=str(cut), **common), progress=False, log=stop_at_epoch_2)
    _old_checkpoint(cut / RunFolder.CHECKPOINT)
    lines: list[str] = []
    train(RunConfig(out=str(cut), **common), progress=False, log=lines.append)
    assert any("resuming after epoch 2" in line for line in lines)
    a, b = pd.read_csv(whole / RunFolder.HISTORY), pd.read_csv(cut / RunFolder.HISTORY)
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
    np.testing.assert_allclose(a.test_roc_auc, b.test_roc_auc, atol=1e-6)
    ma, mb = whole.read_metrics(), RunFolder(cut).read_metrics()
    assert ma["selected_epoch"] == mb["selected_epoch"]
    assert ma["test"]["roc_auc"] == pytest.approx(mb["test"]["roc_auc"], abs=1e-9)


def test_first_layout_segmentation_and_detection_model_files_load(tmp_path):
    """What ``model.pt`` held before format 3, written by hand from a fresh network."""
    from dataclasses import asdict

    from medxfer.detection.model import DetectorSpec, build_detector
    from medxfer.segmentation.model import SegmentationModel
    from medxfer.segmentation.options import SegmentationOptions

    options = SegmentationOptions(data="m.csv", out=str(tmp_path), mode="scratch")
    torch.manual_seed(0)
    net = SegmentationModel(options.model_spec, 2, options.decoder_width, load_weights=False)
    seg_file = tmp_path / "seg.pt"
    torch.save(
        {
            "options": asdict(options),
            "state_dict": net.state_dict(),
            "labels": [0, 255],
            "taps": [asdict(t) for t in net.taps],
        },
        seg_file,
    )
    seg = medxfer.load(seg_file)
    assert seg.labels == [0, 255] and read_model_file(seg_file).family == "segmentation"
    for key, value in net.state_dict().items():
        assert torch.equal(seg.model.state_dict()[key], value), key

    # three pyramid levels with two anchor sizes each, as anchors_from_boxes gives
    sizes = ((7.0, 10.0), (14.0, 20.0), (28.0, 40.0))
    spec = DetectorSpec("mobilenet_v2", "scratch", ("RBC", "WBC"), 128, sizes, (0.8, 1.0, 1.2))
    detector = build_detector(spec, load_weights=False)
    det_file = tmp_path / "det.pt"
    torch.save({"spec": spec.to_dict(), "state_dict": detector.state_dict()}, det_file)
    det = medxfer.load(det_file)
    assert det.spec == spec and det.options is None
    for key, value in detector.state_dict().items():
        assert torch.equal(det.model.state_dict()[key], value), key
