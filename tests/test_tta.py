"""``--tta N``: fixed test-time views (against torchvision's own crop-and-resize), the mean
probability and its tie-free scores (against a direct float64 computation), and a run whose
stored probabilities are the hand average of its views."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy.special import expit, softmax

from medxfer.cli import main
from medxfer.data.augment import TTA_CROP, TTA_VIEWS, tta_view
from medxfer.tasks import make_task


def test_views_are_mirrors_and_90_percent_crops():
    x = torch.rand(2, 1, 40, 40)
    side, crop = 40, round(TTA_CROP * 40)
    corners = {
        "center": ((side - crop) // 2, (side - crop) // 2),
        "top_left": (0, 0),
        "top_right": (0, side - crop),
        "bottom_left": (side - crop, 0),
        "bottom_right": (side - crop, side - crop),
    }
    assert torch.equal(tta_view(x, 0), x)
    assert torch.equal(tta_view(x, 1), TF.hflip(x))
    for name, (top, left) in corners.items():
        want = TF.resized_crop(x, top, left, crop, crop, [side, side], antialias=False)
        torch.testing.assert_close(tta_view(x, TTA_VIEWS.index(name)), want)
    want = TF.hflip(TF.resized_crop(x, 2, 2, crop, crop, [side, side], antialias=False))
    torch.testing.assert_close(tta_view(x, TTA_VIEWS.index("center_hflip")), want)


def test_mean_probability_and_its_scores():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3, size=(4, 50))
    binary = make_task("binary", ["N", "P"])
    mean = expit(z).mean(0)
    np.testing.assert_allclose(binary.mean_probabilities(z), mean)
    np.testing.assert_allclose(binary.mean_scores(z), np.log(mean / (1 - mean)), rtol=1e-9)
    zk = rng.normal(size=(3, 20, 4))
    multi = make_task("multiclass", list("abcd"))
    mean = softmax(zk, axis=2).mean(0)
    np.testing.assert_allclose(multi.mean_probabilities(zk), mean)
    np.testing.assert_allclose(multi.mean_scores(zk), np.log(mean), rtol=1e-9)
    # a confident model: probabilities round to 1, the scores keep their order
    far = np.array([[40.0, 45.0], [41.0, 46.0]])
    assert binary.mean_probabilities(far).tolist() == [1.0, 1.0]
    assert binary.mean_scores(far)[0] < binary.mean_scores(far)[1]


@pytest.mark.integration
def test_a_tta_run_stores_the_mean_over_its_views(small_kermany, tmp_path):
    from medxfer.api import load
    from medxfer.classification.run import load_data
    from medxfer.device import Runtime

    run = tmp_path / "run"
    args = ["train", "--data", str(small_kermany), "--out", str(run), "--tta", "3"]
    assert main([*args, "--image-size", "32", "--epochs", "2", "--bootstrap", "0", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["run"]["tta"] == 3
    model = load(run)
    ctx = load_data(model.config, Runtime.create("cpu", progress=False))
    test = ctx.data.splits["test"]
    pixels = ctx.data.pixels[test]
    hand = np.mean([expit(model.logits(pixels, view=v)) for v in range(3)], axis=0)
    stored = pd.read_csv(run / "predictions.csv").set_index("file")
    files = [ctx.data.records[i].source for i in test.tolist()]
    np.testing.assert_allclose(stored.loc[files, "probability"], hand, atol=1e-5)
    single = expit(model.logits(pixels))
    assert np.abs(single - hand).max() > 1e-4  # the views really were averaged
