"""BatchNorm statistics of trainable networks are re-estimated before each evaluation."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medxfer.data.augment import get_augmentation
from medxfer.data.prepared import DataOptions, prepare_data
from medxfer.device import to_input
from medxfer.models.factory import ModelSpec, create_model
from medxfer.tasks import make_task
from medxfer.training.loop import (
    ClassifierEpochs,
    ImageSource,
    Schedule,
    build_optimizer,
    predict_logits,
    reestimate_batchnorm,
)
from tests.conftest import make_subset

CPU = torch.device("cpu")


def _norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.integration
def test_scratch_mobilenet_is_no_constant_in_eval_mode(tmp_path):
    """Scratch MobileNet v2 after 2 epochs: with the lagging momentum running statistics
    every image got the same logit (to ~1e-7) in eval mode; re-estimated, they separate."""
    data = prepare_data(
        str(make_subset(tmp_path / "data", {"train": 64, "test": 5})),
        64,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    torch.manual_seed(0)
    model = create_model(ModelSpec("mobilenet_v2", mode="scratch"))
    source = ImageSource(
        model, data.pixels, CPU, get_augmentation("paper"), seed=0, eval_batch_size=50
    )
    optimizer = build_optimizer(model.parameters(), "adam", 1e-3, 0.0, 0.9)
    epochs = ClassifierEpochs(
        source,
        data,
        make_task("binary", data.classes),
        Schedule(optimizer, epochs=2, batch_size=32, select="last", seed=0),
        progress=False,
    )
    for epoch in (1, 2):
        epochs.train_one_epoch(epoch)
    train = data.splits["train"]
    logits = predict_logits(model, source, train)
    assert np.ptp(logits) > 0.1
    assert roc_auc_score(data.targets[train].numpy(), logits) > 0.6


def test_reestimated_statistics_match_update_bn(tmp_path):
    """One batch of real images: the same statistics as torch's own ``update_bn``."""
    data = prepare_data(
        str(make_subset(tmp_path / "data", {"train": 6, "test": 2})),
        32,
        DataOptions(val_fraction=0),  # a handful of images: no validation carved
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    torch.manual_seed(0)
    model = create_model(ModelSpec("mobilenet_v2", mode="scratch")).double()
    reference = copy.deepcopy(model)
    train = data.splits["train"]
    images = to_input(data.pixels[train], CPU).double()  # float64: no rounding differences
    source = SimpleNamespace(eval_inputs=lambda idx: to_input(data.pixels[idx], CPU).double())
    reestimate_batchnorm(model, source, train, batch_size=len(train), device=CPU, amp=None)
    torch.optim.swa_utils.update_bn([images], reference)
    ours, theirs = _norms(model), _norms(reference)
    for name, norm in ours.items():
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(norm, stat), getattr(theirs[name], stat))
        assert norm.momentum == 0.1  # restored
    assert not torch.equal(
        ours["backbone.features.0.1"].running_var, torch.ones(32, dtype=torch.float64)
    )


def test_frozen_layers_keep_their_imagenet_statistics(tmp_path):
    data = prepare_data(
        str(make_subset(tmp_path / "data", {"train": 4, "test": 2})),
        32,
        DataOptions(val_fraction=0),  # a handful of images: no validation carved
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    model = create_model(ModelSpec("mobilenet_v2", mode="partial", trainable_stages=1))
    before = copy.deepcopy(model)
    source = ImageSource(model, data.pixels, CPU, None, seed=0, eval_batch_size=8)
    reestimate_batchnorm(model, source, data.splits["train"], batch_size=4, device=CPU, amp=None)
    after, imagenet = _norms(model), _norms(before)
    for name, norm in after.items():
        same = torch.equal(norm.running_var, imagenet[name].running_var)
        assert same == (not name.startswith("backbone.features.18")), name
