"""End-to-end runs on small real subsets of the Kermany chest X-rays (64 px, few epochs)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medxfer.classification.run import evaluate, train
from medxfer.classification.trained import TrainedModel
from medxfer.cli import main
from medxfer.config import RunConfig
from medxfer.models.factory import create_model
from medxfer.models.stages import backbone_stages
from medxfer.storage.folder import RunFolder
from tests.conftest import MOBILENET_FILE, make_subset

pytestmark = pytest.mark.integration

FAST = ["--image-size", "64", "--epochs", "2", "--bootstrap", "50", "--quiet"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_transfer_run_writes_a_complete_run_folder(small_kermany, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", small_kermany, "--out", out, *FAST) == 0
    assert {p.name for p in out.iterdir()} == {
        RunFolder.CONFIG,
        RunFolder.HISTORY,
        RunFolder.METRICS,
        RunFolder.PREDICTIONS,
        RunFolder.MODEL,
        RunFolder.RELIABILITY,
        RunFolder.MODEL_CARD,
    }
    config = json.loads((out / RunFolder.CONFIG).read_text())
    assert config["run"]["arch"] == "mobilenet_v2" and config["resolved"]["feature_cache"]
    assert config["environment"]["torch"] == torch.__version__
    history = pd.read_csv(out / RunFolder.HISTORY)
    assert list(history.epoch) == [1, 2]
    assert {"train_loss", "train_accuracy", "val_f1", "test_gmean", "test_roc_auc"} <= set(
        history.columns
    )
    metrics = json.loads((out / RunFolder.METRICS).read_text())
    assert metrics["positive"] == "PNEUMONIA" and metrics["test"]["n"] == 20
    lo, hi = metrics["test"]["ci95"]["accuracy"]
    assert lo <= metrics["test"]["accuracy"] <= hi
    predictions = pd.read_csv(out / RunFolder.PREDICTIONS)
    sizes = metrics["split_sizes"]
    assert list(predictions.split.value_counts().sort_index()) == [sizes["test"], sizes["val"]]
    assert predictions.probability.between(0, 1).all()
    assert predictions.patient.str.match(r"^(person\d+|(NORMAL2-)?IM-\d+)$").all()
    # model.pt is the selected epoch: it reproduces predictions.csv, val rows and test rows
    model = TrainedModel.load(out)
    from medxfer.inference.predict import predict_files

    again = predict_files(model, [Path(f) for f in predictions.file])
    np.testing.assert_allclose(again.probability, predictions.probability, atol=1e-6)
    assert list(again.predicted) == list(predictions.predicted)
    # evaluate reproduces the test metrics from the saved model
    again = evaluate(out, str(small_kermany), progress=False)
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert again["roc_auc"] == pytest.approx(metrics["test"]["roc_auc"], abs=1e-6)
    # a finished run is not trained again
    assert run_cli("train", "--data", small_kermany, "--out", out, *FAST) == 0


def test_fast_path_matches_plain_loop_without_augmentation(small_kermany, tmp_path):
    """Cached features + head training == full forward every epoch, when nothing is random."""
    common = dict(
        data=str(small_kermany), image_size=64, epochs=3, augment="none", bootstrap=0, batch_size=16
    )
    fast = train(
        RunConfig(out=str(tmp_path / "fast"), **common), progress=False, log=lambda _: None
    )
    plain = train(
        RunConfig(out=str(tmp_path / "plain"), feature_cache=False, **common),
        progress=False,
        log=lambda _: None,
    )
    head_fast = TrainedModel.load(fast).network.head.linear.weight.detach()
    head_plain = TrainedModel.load(plain).network.head.linear.weight.detach()
    torch.testing.assert_close(head_fast, head_plain, atol=1e-4, rtol=1e-3)
    hf, hp = pd.read_csv(fast / RunFolder.HISTORY), pd.read_csv(plain / RunFolder.HISTORY)
    np.testing.assert_allclose(hf.train_loss, hp.train_loss, rtol=1e-4)
    np.testing.assert_allclose(hf.test_accuracy, hp.test_accuracy)
    np.testing.assert_allclose(hf.test_roc_auc, hp.test_roc_auc, atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        ["--mode", "scratch", "--arch", "resnet18"],
        ["--mode", "finetune"],
        ["--mode", "partial", "--trainable-stages", "2"],
        ["--mode", "partial", "--trainable-stages", "2", "--bn", "adapt"],
        ["--mode", "transfer"],
        ["--mode", "transfer", "--bn", "adapt"],
        ["--mode", "transfer", "--bn", "train", "--threshold", "youden"],
        ["--mode", "scratch", "--arch", "inception_v3", "--image-size", "75"],
    ],
)
def test_every_mode_trains(small_kermany, tmp_path, extra):
    """Each mode trains exactly what it says: compared tensor by tensor with the network the
    run started from (for pretrained modes, the ImageNet file itself)."""
    out = tmp_path / "run"
    assert run_cli("train", "--data", small_kermany, "--out", out, *FAST, *extra) == 0
    metrics = json.loads((out / RunFolder.METRICS).read_text())
    cfg = RunFolder(out).read_config()
    assert metrics["mode"] == cfg.mode == extra[1]
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["test"]["roc_auc"] is not None
    initial = _initial_network(cfg)
    trained = torch.load(out / RunFolder.MODEL, weights_only=False)["state_dict"]
    changed = {k for k, v in initial.state_dict().items() if not torch.equal(trained[k], v)}
    params = {f"backbone.{n}" for n, _ in initial.backbone.named_parameters()}
    stats = {k for k in initial.state_dict() if k.endswith(("running_mean", "running_var"))}
    assert {"head.linear.weight", "head.linear.bias"} <= changed  # the new head trains
    if cfg.mode in ("scratch", "finetune"):
        assert params | stats <= changed
        return
    stages = backbone_stages(initial.backbone)
    last = cfg.trainable_stages if cfg.mode == "partial" else 0
    trainable = tuple(f"backbone.{name}." for name, _ in stages[len(stages) - last :])
    in_trainable = {k for k in params | stats if trainable and k.startswith(trainable)}
    assert changed & params == in_trainable & params  # the rest of the backbone: the file's
    frozen_stats = stats - in_trainable
    if cfg.bn == "frozen":
        assert not changed & frozen_stats  # a true linear probe: eval statistics, untouched
    else:  # adapt: re-estimated on the X-rays; train: batch statistics while training
        assert frozen_stats <= changed
    assert in_trainable & stats <= changed


def _initial_network(cfg: RunConfig):
    """The network a run of ``cfg`` starts from (same seed and spec as the pipeline); for
    pretrained modes its backbone is checked to be the ImageNet file's tensors."""
    torch.manual_seed(cfg.seed)
    network = create_model(replace(cfg.model_spec, outputs=1))
    if cfg.mode != "scratch":
        imagenet = torch.load(MOBILENET_FILE, weights_only=True)
        for key, value in network.backbone.state_dict().items():
            assert torch.equal(value, imagenet[key]), key
    return network


def test_bn_adapt_changes_running_statistics(small_kermany, tmp_path):
    common = dict(data=str(small_kermany), image_size=64, epochs=1, bootstrap=0)
    frozen = train(RunConfig(out=str(tmp_path / "f"), **common), progress=False, log=lambda _: None)
    adapt = train(
        RunConfig(out=str(tmp_path / "a"), bn="adapt", **common), progress=False, log=lambda _: None
    )
    key = "backbone.features.0.1.running_mean"
    sf = torch.load(frozen / RunFolder.MODEL, weights_only=False)["state_dict"][key]
    sa = torch.load(adapt / RunFolder.MODEL, weights_only=False)["state_dict"][key]
    assert not torch.allclose(sf, sa)


def test_npz_source_trains(tmp_path, kermany):
    def stack(split, n):
        images, labels = [], []
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for f in sorted((kermany / split / cls).iterdir())[:n]:
                images.append(np.asarray(Image.open(f).convert("L").resize((28, 28))))
                labels.append([label])
        return np.stack(images), np.array(labels)

    arrays = {}
    for split, n in (("train", 20), ("val", 4), ("test", 8)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = stack(split, n)
    np.savez(tmp_path / "pneumonia.npz", **arrays)
    out = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--data",
            tmp_path / "pneumonia.npz",
            "--out",
            out,
            *FAST,
            "--val-fraction",
            "0",
        )
        == 0
    )
    metrics = json.loads((out / RunFolder.METRICS).read_text())
    assert metrics["positive"] == "1" and metrics["split_sizes"] == {
        "train": 40,
        "val": 8,
        "test": 16,
    }


def test_csv_source_trains(tmp_path, kermany):
    rows = ["path,label,split"]
    for split, n in (("train", 12), ("test", 6)):
        for cls in ("NORMAL", "PNEUMONIA"):
            for f in sorted((kermany / split / cls).iterdir())[:n]:
                rows.append(f"{f},{cls},{split}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--data",
            tmp_path / "manifest.csv",
            "--out",
            out,
            *FAST,
            "--val-fraction",
            "0.25",
        )
        == 0
    )
    metrics = json.loads((out / RunFolder.METRICS).read_text())
    assert metrics["split_sizes"]["val"] > 0 and metrics["test"]["n"] == 12


@pytest.mark.parametrize("mode", ["transfer", "scratch"])  # scratch: dropout's random stream
def test_interrupted_run_resumes_to_the_same_result(small_kermany, tmp_path, mode):
    common = dict(data=str(small_kermany), image_size=64, epochs=3, bootstrap=0, mode=mode)
    whole = train(
        RunConfig(out=str(tmp_path / "whole"), **common), progress=False, log=lambda _: None
    )

    def stop_at_epoch_2(line: str) -> None:
        if line.startswith("epoch   2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(RunConfig(out=str(tmp_path / "cut"), **common), progress=False, log=stop_at_epoch_2)
    cut = tmp_path / "cut"
    assert (cut / RunFolder.CHECKPOINT).exists() and not (cut / RunFolder.METRICS).exists()
    train(RunConfig(out=str(cut), **common), progress=False, log=lambda _: None)
    a, b = pd.read_csv(whole / RunFolder.HISTORY), pd.read_csv(cut / RunFolder.HISTORY)
    assert list(b.epoch) == [1, 2, 3]
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
    np.testing.assert_allclose(a.test_roc_auc, b.test_roc_auc, atol=1e-6)
    assert not (cut / RunFolder.CHECKPOINT).exists()


def test_skip_bad_lists_unreadable_images(tmp_path):
    data = make_subset(tmp_path / "d", {"train": 12, "test": 6})
    victim = sorted((data / "train" / "PNEUMONIA").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])
    out = tmp_path / "run"
    assert (
        run_cli(
            "train", "--data", data, "--out", out, *FAST, "--val-fraction", "0.25", "--skip-bad"
        )
        == 0
    )
    metrics = json.loads((out / RunFolder.METRICS).read_text())
    assert [s["file"] for s in metrics["skipped_inputs"]] == [str(victim)]


def _corrupt(data):
    victim = sorted((data / "train" / "NORMAL").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])
    return victim.name


def _single_class_test(data):
    shutil.rmtree(data / "test" / "NORMAL")
    (data / "test" / "NORMAL").mkdir()
    return "test/NORMAL: empty class folder"


BAD_INPUTS = {
    "missing split": (lambda d: shutil.rmtree(d / "train") or "train: missing split folder", []),
    "missing class": (
        lambda d: shutil.rmtree(d / "test" / "PNEUMONIA") or "test/PNEUMONIA: missing class folder",
        [],
    ),
    "empty class": (_single_class_test, []),
    "non-image file": (
        lambda d: (d / "train" / "NORMAL" / "x.txt").write_text("x") and "x.txt",
        [],
    ),
    "truncated image": (_corrupt, []),
    "unknown architecture": (lambda d: "unknown architecture 'alexnet2'", ["--arch", "alexnet2"]),
    "missing weights": (lambda d: "densenet161-8d451a50.pth", ["--arch", "densenet161"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_clear_line_and_no_output(case, tmp_path, capsys):
    data = make_subset(tmp_path / "d", {"train": 6, "test": 4})
    damage, extra = BAD_INPUTS[case]
    expected = damage(data)
    out = tmp_path / "run"
    code = run_cli("train", "--data", data, "--out", out, *FAST, "--val-fraction", "0", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("medxfer: error: ") and expected in err[0]
    assert not out.exists()


def test_single_class_test_split_in_csv(tmp_path, kermany):
    rows = ["path,label,split"]
    for cls in ("NORMAL", "PNEUMONIA"):
        for f in sorted((kermany / "train" / cls).iterdir())[:4]:
            rows.append(f"{f},{cls},train")
    for f in sorted((kermany / "test" / "NORMAL").iterdir())[:4]:
        rows.append(f"{f},NORMAL,test")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(Exception, match="test split has only class 'NORMAL'"):
        train(RunConfig(data=str(tmp_path / "m.csv"), out=str(tmp_path / "r")), progress=False)
    assert not (tmp_path / "r").exists()


def test_evaluate_a_run_with_its_own_cache_dir(small_kermany, tmp_path):
    cfg = RunConfig(
        data=str(small_kermany),
        out=str(tmp_path / "run"),
        image_size=64,
        epochs=1,
        bootstrap=0,
        cache_dir=str(tmp_path / "cache"),
    )
    run = train(cfg, progress=False, log=lambda _: None)
    assert (tmp_path / "cache" / "images").is_dir() and (tmp_path / "cache" / "features").is_dir()
    result = evaluate(run, str(small_kermany), progress=False)
    metrics = json.loads((run / RunFolder.METRICS).read_text())["test"]
    assert result["accuracy"] == pytest.approx(metrics["accuracy"])
