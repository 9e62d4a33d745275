"""Options with metadata: every option of the three families has help, its choices and bounds
are enforced in one line naming the flag, the command line offers exactly the fields, and run
folders of the previous version (without the options added since) still load."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from medxfer.cli import build_parser
from medxfer.config import RunConfig
from medxfer.detection.options import DetectionOptions
from medxfer.detection.options import options_from_dict as detection_options
from medxfer.errors import MedxferError
from medxfer.segmentation.options import SegmentationOptions
from medxfer.segmentation.options import options_from_dict as segmentation_options

FAMILIES = {"train": RunConfig, "segment": SegmentationOptions, "detect": DetectionOptions}


@pytest.mark.parametrize("options", FAMILIES.values())
def test_every_option_has_help(options):
    missing = [f.name for f in fields(options) if not f.metadata.get("help")]
    assert missing == []


@pytest.mark.parametrize(
    ("options", "change", "message"),
    [
        (RunConfig, {"optimizer": "rmsprop"}, "--optimizer 'rmsprop': choose from adam, adamw"),
        (RunConfig, {"epochs": 0}, "--epochs 0: must be at least 1"),
        (RunConfig, {"lr": 0.0}, "--lr 0.0: must be above 0.0"),
        (RunConfig, {"lr": float("inf")}, "--lr inf: must be a finite number"),
        (SegmentationOptions, {"lr": float("nan")}, "--lr nan: must be a finite number"),
        (RunConfig, {"views": "2"}, "--views '2': must be an integer"),
        (SegmentationOptions, {"select": "val_auc"}, "--select 'val_auc': choose from val_dice"),
        (SegmentationOptions, {"decoder_width": 0}, "--decoder-width 0: must be at least 1"),
        (SegmentationOptions, {"optimizer": "adagrad"}, "--optimizer 'adagrad': choose from"),
        (DetectionOptions, {"mode": "partial"}, "--mode 'partial': choose from transfer"),
        (DetectionOptions, {"optimizer": "adam"}, "--optimizer 'adam': choose from sgd, adamw"),
        (DetectionOptions, {"augment": "yes"}, "--augment 'yes': must be true or false"),
        (DetectionOptions, {"track": "wandb"}, "--track 'wandb': choose from none, mlflow"),
    ],
)
def test_a_value_outside_its_choices_or_bounds_is_one_line(options, change, message):
    with pytest.raises(MedxferError, match=message) as info:
        options(data="d", out="o", **change).validate()
    assert "\n" not in str(info.value)


def _train_flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    chosen = sub.choices[command]
    if command != "train":
        verbs = next(a for a in chosen._actions if isinstance(a, argparse._SubParsersAction))
        chosen = verbs.choices["train"]
    return {a.dest for a in chosen._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("command", FAMILIES)
def test_each_train_command_offers_exactly_its_options(command):
    expected = {f.name for f in fields(FAMILIES[command])} | {"overwrite", "quiet"}
    assert _train_flags(command) == expected


def test_run_folders_of_the_previous_version_load():
    """config.json's ``run`` as the previous version wrote it for segmentation and detection:
    no optimizer, momentum or tracking options (their defaults apply, Adam for masks)."""
    old_segmentation = {
        "data": "m.csv",
        "out": "r",
        "arch": "mobilenet_v2",
        "mode": "transfer",
        "bn": "frozen",
        "trainable_stages": 1,
        "normalize": "paper",
        "weights": None,
        "image_size": 128,
        "labels": "0,255",
        "epochs": 20,
        "batch_size": 16,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "loss": "ce+dice",
        "ce_weight": 1.0,
        "dice_weight": 1.0,
        "decoder_width": 64,
        "augment": "paper",
        "select": "val_dice",
        "feature_cache": False,
        "bootstrap": 1000,
        "seed": 0,
        "device": "auto",
        "amp": True,
        "eval_batch_size": None,
    }
    seg = segmentation_options(old_segmentation)
    assert seg.optimizer == "adam" and seg.criterion == "ce+dice" and seg.track == "none"
    old_detection = {
        "data": "b.csv",
        "out": "r",
        "arch": "mobilenet_v2",
        "mode": "transfer",
        "image_size": 320,
        "epochs": 10,
        "batch_size": 4,
        "optimizer": "sgd",
        "lr": 0.01,
        "weight_decay": 1e-4,
        "classes": None,
        "weights": None,
        "fpn_channels": 64,
        "augment": True,
        "limit": None,
        "bootstrap": 1000,
        "seed": 0,
        "device": "auto",
    }
    det = detection_options(old_detection)
    assert det.optimizer == "sgd" and det.lr == 0.01 and det.tracking_uri is None
    det.validate()
    seg.validate()


def test_a_study_files_number_threshold_is_a_rule():
    assert RunConfig(data="d", out="o", threshold=0.3).threshold == "0.3"
