import numpy as np
import pytest
import torch
from medxfer.training.metrics import binary_metrics, bootstrap_ci, choose_threshold

from medxfer.data.augment import Augmentation, augment_batch, get_augmentation
from medxfer.errors import MedxferError


def test_augment_is_per_image_and_reproducible():
    images = torch.rand(1, 1, 32, 32).repeat(4, 1, 1, 1)
    out1 = augment_batch(images, Augmentation(), torch.Generator().manual_seed(0))
    out2 = augment_batch(images, Augmentation(), torch.Generator().manual_seed(0))
    assert out1.shape == images.shape and out1.min() >= 0 and out1.max() <= 1
    torch.testing.assert_close(out1, out2)
    assert not torch.allclose(out1[0], out1[1])  # each image gets its own parameters


def test_identity_augmentation_keeps_image():
    images = torch.rand(3, 1, 16, 16)
    identity = Augmentation(
        crop_scale=(1, 1), crop_ratio=(1, 1), rotation_deg=0, hflip_p=0, brightness=0, contrast=0
    )
    out = augment_batch(images, identity, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_flip_mirrors_image():
    images = torch.rand(2, 1, 16, 16)
    flip = Augmentation(
        crop_scale=(1, 1), crop_ratio=(1, 1), rotation_deg=0, hflip_p=1.0, brightness=0, contrast=0
    )
    out = augment_batch(images, flip, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)


def test_unknown_preset():
    with pytest.raises(MedxferError, match="unknown preset"):
        get_augmentation("heavy")


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
    one_class = binary_metrics(np.ones(3, dtype=int), np.array([0.2, 0.8, 0.9]))
    assert one_class["roc_auc"] is None and one_class["accuracy"] == pytest.approx(2 / 3)


def test_bootstrap_interval_brackets_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.4 + rng.random(300) * 0.6, 0, 1)
    point = binary_metrics(y, p)
    ci = bootstrap_ci(y, p, 0.5, n_resamples=200)
    for k in ("accuracy", "f1", "roc_auc"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi and hi - lo < 0.2


def test_thresholds():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.5, 0.8, 0.9])
    assert choose_threshold("0.5", None, None) == 0.5
    youden = choose_threshold("youden", y, p)
    assert binary_metrics(y, p, youden)["gmean"] > 0.8
    sens = choose_threshold("sens=1.0", y, p)
    assert binary_metrics(y, p, sens)["recall"] == 1.0
    with pytest.raises(MedxferError, match="needs a validation split"):
        choose_threshold("youden", None, None)


def test_threshold_rules_are_checked_up_front():
    from medxfer.config import RunConfig

    for bad in ("abc", "sens=2", "1.5"):
        with pytest.raises(MedxferError, match="--threshold"):
            RunConfig(data="d", out="o", threshold=bad).validate()
    for good in ("0.5", "youden", "sens=0.9"):
        RunConfig(data="d", out="o", threshold=good).validate()
