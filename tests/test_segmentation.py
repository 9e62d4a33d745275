"""Segmentation on a frozen ImageNet backbone (the paper's Section 3.4) on real lung masks:
training end to end, resume, predict, ONNX, the metrics and losses against independent
references, the joint augmentation, the backbone taps, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, jaccard_score

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.models.factory import ModelSpec
from medxfer.segmentation.data import load_segmentation
from medxfer.segmentation.engine import Loader, augment_pair, encode_all, evaluate
from medxfer.segmentation.losses import SegmentationLoss
from medxfer.segmentation.metrics import per_image, summarize
from medxfer.segmentation.model import SegmentationModel
from medxfer.segmentation.options import SegmentationOptions
from medxfer.segmentation.run import load_segmentation_run, train_segmentation
from tests.conftest import MOBILENET_FILE, SHARED

LUNG = SHARED / "data" / "lung_seg"
SIZE = 64
needs_lung = pytest.mark.skipif(not LUNG.is_dir(), reason=f"{LUNG} not present")


# --- fixtures: a real lung_seg subset and one trained run -------------------------------------


@pytest.fixture(scope="module")
def lung_manifest(tmp_path_factory) -> Path:
    """24 train / 8 val / 8 test lung_seg pairs, as a CSV manifest with absolute paths."""
    table = pd.read_csv(LUNG / "split.csv")
    parts = [table[table.split == s].head(n) for s, n in (("train", 24), ("val", 8), ("test", 8))]
    rows = pd.concat(parts)
    manifest = pd.DataFrame(
        {
            "path": [str(LUNG / p) for p in rows["image"]],
            "mask": [str(LUNG / p) for p in rows["mask"]],
            "split": rows["split"].to_numpy(),
        }
    )
    path = tmp_path_factory.mktemp("lung") / "manifest.csv"
    manifest.to_csv(path, index=False)
    return path


def _options(manifest: Path, out: Path, **changes) -> SegmentationOptions:
    values = dict(
        data=str(manifest), out=str(out), image_size=SIZE, epochs=2, batch_size=8, bootstrap=200
    )
    return SegmentationOptions(**{**values, **changes})


@pytest.fixture(scope="module")
def trained_run(lung_manifest, tmp_path_factory) -> Path:
    """Frozen MobileNet v2 + U-Net decoder, 2 epochs at 64 px, trained through the CLI."""
    out = tmp_path_factory.mktemp("segrun") / "run"
    argv = ["segment", "train", "--data", str(lung_manifest), "--out", str(out)]
    argv += ["--image-size", str(SIZE), "--epochs", "2", "--batch-size", "8", "--bootstrap", "200"]
    argv += ["--feature-cache"]
    assert main([*argv, "--quiet"]) == 0
    return out


# --- end to end ---------------------------------------------------------------------------------


@needs_lung
def test_transfer_run_beats_trivial_predictors(trained_run, lung_manifest):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    data = load_segmentation(lung_manifest, SIZE)
    truth = data.masks[data.splits["test"]].numpy().reshape(8, -1)
    # All-foreground: Dice = 2|G| / (|G| + N) per image (all-background scores 0).
    all_fg = np.mean([f1_score(t, np.ones_like(t)) for t in truth])
    assert metrics["test"]["dice"] > all_fg + 0.15, (metrics["test"]["dice"], all_fg)
    assert metrics["test"]["dice"] > 0.6
    low, high = metrics["test"]["ci95"]["dice"]
    assert low <= metrics["test"]["dice"] <= high
    assert metrics["split_sizes"] == {"train": 24, "val": 8, "test": 8}
    assert metrics["selected_epoch"] in (1, 2)

    history = pd.read_csv(trained_run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    for column in ("train_loss", "val_dice", "val_iou", "val_pixel_accuracy", "test_dice"):
        assert history[column].notna().all()
    every = pd.read_csv(trained_run / "predictions.csv")
    assert list(every.columns[:6]) == ["split", "file", "patient", "dice", "iou", "pixel_accuracy"]
    assert every.patient.str.startswith("file:").all()  # no patient column: one per image
    assert every.split.value_counts().to_dict() == {"val": 8, "test": 8}
    rows = every[every.split == "test"]
    assert "hd95" in rows.columns and len(rows) == 8
    assert rows["dice"].mean() == pytest.approx(metrics["test"]["dice"])
    assert not (trained_run / "checkpoint.pt").exists()
    config = json.loads((trained_run / "config.json").read_text())
    assert [t["stage"] for t in config["resolved"]["taps"]] == [
        "features.3",
        "features.6",
        "features.13",
        "features.18",
    ]


@needs_lung
def test_feature_cache_size_and_equivalence(trained_run, lung_manifest):
    """The cached val/test encoder outputs take what their shapes say, and decoding from them
    gives the same masks as the full forward pass."""
    metrics = json.loads((trained_run / "metrics.json").read_text())
    model, _ = load_segmentation_run(trained_run)
    per_image_floats = sum(t.channels * (SIZE // t.stride) ** 2 for t in model.taps)
    assert metrics["feature_cache"]["used"]
    assert metrics["feature_cache"]["bytes"] == 16 * per_image_floats * 4

    data = load_segmentation(lung_manifest, SIZE)
    loader = Loader(data.images, data.masks, data.splits["test"], 3)
    cpu, loss_fn = torch.device("cpu"), SegmentationLoss()
    cached = encode_all(model, loader, cpu)
    loss_a, pred_a = evaluate(model, loss_fn, loader, device=cpu, encoded=cached)
    loss_b, pred_b = evaluate(model, loss_fn, loader, device=cpu)
    assert torch.equal(pred_a, pred_b)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)


@needs_lung
def test_transfer_keeps_backbone_weights_of_the_file(trained_run):
    state = torch.load(trained_run / "model.pt", weights_only=False)["state_dict"]
    reference = torch.load(MOBILENET_FILE, weights_only=True)
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    assert len(encoder) > 250
    for key, value in encoder.items():
        assert torch.equal(value, reference[key]), key  # weights and BatchNorm statistics


@needs_lung
def test_resume_after_interruption_matches_uninterrupted_run(trained_run, lung_manifest, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1"):
            raise Stop

    options = _options(lung_manifest, tmp_path / "run")
    with pytest.raises(Stop):
        train_segmentation(options, log=stop_after_first_epoch)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()
    lines: list[str] = []
    train_segmentation(options, log=lines.append)
    assert any("resuming after epoch 1" in line for line in lines)
    resumed = pd.read_csv(tmp_path / "run" / "history.csv")
    straight = pd.read_csv(trained_run / "history.csv")
    for column in ("train_loss", "val_dice", "test_dice"):
        np.testing.assert_allclose(resumed[column], straight[column], rtol=1e-4)

    with pytest.raises(MedxferError, match="other settings"):
        train_segmentation(_options(lung_manifest, tmp_path / "run", epochs=3))


@needs_lung
def test_predict_writes_masks_and_overlays(trained_run, tmp_path, capsys):
    names = pd.read_csv(LUNG / "split.csv").query("split == 'test'").head(2)
    inputs = [str(LUNG / p) for p in names["image"]]
    assert main(["segment", "predict", str(trained_run), *inputs, "--out", str(tmp_path)]) == 0
    for image, mask in zip(names["image"], names["mask"], strict=True):
        stem = Path(image).stem
        predicted = np.asarray(Image.open(tmp_path / f"{stem}_mask.png"))
        truth = np.asarray(Image.open(LUNG / mask))
        assert predicted.shape == truth.shape  # the input's own size (256 px)
        assert set(np.unique(predicted)) <= {0, 255}
        assert f1_score(truth.ravel() > 0, predicted.ravel() > 0) > 0.6
        overlay = Image.open(tmp_path / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == truth.shape[::-1]


@needs_lung
def test_onnx_export_matches_pytorch(trained_run, lung_manifest, capsys):
    import onnxruntime

    assert main(["segment", "export", str(trained_run)]) == 0
    path = trained_run / "model.onnx"
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["labels"] == [0, 255] and meta["input"]["shape"][1:] == [1, SIZE, SIZE]
    model, _ = load_segmentation_run(trained_run)
    data = load_segmentation(lung_manifest, SIZE)
    x = data.images[data.splits["test"][:5]].unsqueeze(1).float() / 255.0
    with torch.inference_mode():
        want = torch.softmax(model(x), dim=1).numpy()
    got = onnxruntime.InferenceSession(str(path)).run(None, {"gray": x.numpy()})[0]
    assert got.shape == (5, 2, SIZE, SIZE)
    np.testing.assert_allclose(got, want, atol=1e-4)


# --- metrics and losses vs independent references ---------------------------------------------


def _random_masks(n: int, size: int, classes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    blobs = F.avg_pool2d(torch.rand(n, 1, size, size, generator=gen), 5, 1, 2)  # smooth blobs
    edges = torch.linspace(0.45, 0.55, classes - 1)
    return torch.bucketize(blobs[:, 0], edges).to(torch.uint8)


def test_dice_iou_accuracy_match_sklearn():
    for classes in (2, 3):
        pred, truth = _random_masks(6, 24, classes, 1), _random_masks(6, 24, classes, 2)
        rows = per_image(pred, truth, classes, hd95=False)
        fg = list(range(1, classes))
        for i in range(6):
            p, t = pred[i].numpy().ravel(), truth[i].numpy().ravel()
            assert rows["dice"][i] == pytest.approx(
                np.mean(f1_score(t, p, labels=fg, average=None))
            )
            assert rows["iou"][i] == pytest.approx(
                np.mean(jaccard_score(t, p, labels=fg, average=None))
            )
            assert rows["pixel_accuracy"][i] == pytest.approx(accuracy_score(t, p))


def _edges(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour in the background (outside counts as background)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~inner)


def _brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    ea, eb = _edges(a), _edges(b)
    d = np.sqrt(((ea[:, None, :] - eb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_matches_brute_force():
    pred, truth = _random_masks(5, 20, 2, 3), _random_masks(5, 20, 2, 4)
    pred[4, :3] = 1  # a region touching the image border
    got = per_image(pred, truth, 2)["hd95"]
    for i in range(5):
        want = _brute_hd95(pred[i].numpy().astype(bool), truth[i].numpy().astype(bool))
        assert got[i] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert got.max() > 1  # the masks differ enough for the test to mean something


def test_empty_mask_cases_and_summary():
    truth = torch.zeros(3, 8, 8, dtype=torch.uint8)
    pred = torch.zeros(3, 8, 8, dtype=torch.uint8)
    truth[1, 2:5, 2:5] = 1  # missed entirely
    pred[2, 2:5, 2:5] = 1  # false alarm on an empty image
    rows = per_image(pred, truth, 2)
    np.testing.assert_array_equal(rows["dice"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(rows["iou"], [1.0, 0.0, 0.0])
    assert rows["hd95"][0] == 0.0 and np.isnan(rows["hd95"][1:]).all()
    summary = summarize(rows, resamples=0)
    assert summary["hd95_undefined"] == 2 and summary["hd95"] == 0.0
    assert summary["dice"] == pytest.approx(1 / 3)


def test_bootstrap_interval_is_a_percentile_interval_of_the_mean():
    values = np.random.default_rng(0).uniform(0.6, 0.95, size=60)
    rows = {"dice": values, "iou": values, "pixel_accuracy": values, "hd95": values}
    low, high = summarize(rows, resamples=2000, seed=1)["ci95"]["dice"]
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # normal approximation
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.2)


def test_losses_match_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, generator=gen)
    target = torch.randint(0, 3, (2, 6, 6), generator=gen)
    ce = F.cross_entropy(logits, target).item()
    prob = torch.softmax(logits, 1).numpy()
    onehot = np.eye(3)[target.numpy()].transpose(0, 3, 1, 2)
    inter = (prob * onehot).sum(axis=(0, 2, 3))[1:]  # foreground classes, whole batch
    denom = (prob + onehot).sum(axis=(0, 2, 3))[1:]
    dice = np.mean(1 - (2 * inter + 1e-5) / (denom + 1e-5))
    assert SegmentationLoss("ce")(logits, target).item() == pytest.approx(ce, rel=1e-5)
    assert SegmentationLoss("dice")(logits, target).item() == pytest.approx(dice, rel=1e-5)
    both = SegmentationLoss("ce+dice", ce_weight=0.3, dice_weight=2.0)(logits, target).item()
    assert both == pytest.approx(0.3 * ce + 2.0 * dice, rel=1e-5)
    with pytest.raises(MedxferError, match="--criterion"):
        SegmentationLoss("focal")


# --- augmentation and backbone taps ---------------------------------------------------------


@needs_lung
def test_joint_augmentation_keeps_image_and_mask_aligned():
    from medxfer.data.augment import Augmentation

    mask = np.asarray(Image.open(LUNG / "masks" / "CHNCXR_0001_0.png").resize((SIZE, SIZE)))
    y = torch.from_numpy((mask > 127).astype(np.int64)).repeat(4, 1, 1)
    x = y[:, None].float()  # an "image" that is the mask itself: warps must agree
    aug = Augmentation(brightness=0.0, contrast=0.0)
    gx, gy = augment_pair(x, y, aug, torch.Generator().manual_seed(5))
    assert not torch.equal(gy, y)  # something moved
    agree = ((gx[:, 0] > 0.5).long() == gy).float().mean().item()
    assert agree > 0.99
    assert set(gy.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("arch", "stages"),
    [
        ("mobilenet_v2", ["features.3", "features.6", "features.13", "features.18"]),
        ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
        ("timm/tf_efficientnet_lite0", None),
    ],
)
def test_taps_at_strides_4_to_32(arch, stages):
    model = SegmentationModel(ModelSpec(arch, "scratch"), 3, width=16).eval()
    if stages is None:  # timm: compare with timm's own feature_info for strides 4, 8, 16
        import timm

        info = timm.create_model(arch[5:], features_only=True, pretrained=False).feature_info
        by_stride = dict(zip(info.reduction(), info.module_name(), strict=True))
        stages = [by_stride[4], by_stride[8], by_stride[16], model.taps[-1].stage]
    assert [t.stage for t in model.taps] == stages
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        feats, logits = model.encode(x), model(x)
    assert [f.shape[-1] for f in feats] == [SIZE // s for s in (4, 8, 16, 32)]
    assert logits.shape == (2, 3, SIZE, SIZE)


def test_partial_mode_trains_only_the_last_stage_and_the_decoder():
    from medxfer.segmentation.engine import train_one_epoch

    torch.manual_seed(0)
    model = SegmentationModel(ModelSpec("mobilenet_v2", "partial", trainable_stages=1), 2, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = (torch.rand(4, 32, 32) * 255).to(torch.uint8)
    masks = (images > 128).to(torch.uint8)
    params = [p for p in model.parameters() if p.requires_grad]
    train_one_epoch(
        model,
        SegmentationLoss(),
        torch.optim.SGD(params, lr=0.1),
        Loader(images, masks, torch.arange(4), 4),
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("encoder.features.18.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    frozen = [k for k in changed if k.startswith("encoder.") and ".18." not in k]
    assert frozen == []  # weights and BatchNorm statistics of frozen stages stay put


# --- data and bad input -----------------------------------------------------------------------


def _pair_folder(root: Path, *, masks: dict[str, np.ndarray] | None = None) -> Path:
    """images/a..d.png (40x40) + masks, a split.csv without a mask column."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
            root / "images" / f"{name}.png"
        )
        mask = np.zeros((40, 40), np.uint8)
        mask[5:30, 8:20] = 255
        Image.fromarray((masks or {}).get(name, mask)).save(root / "masks" / f"{name}.png")
    split = pd.DataFrame(
        {"image": [f"images/{n}.png" for n in names], "split": ["train", "train", "val", "test"]}
    )
    split.to_csv(root / "split.csv", index=False)
    return root


def test_folder_layout_with_k_labels_and_nearest_resize(tmp_path):
    labelled = np.zeros((40, 40), np.uint8)
    labelled[:, 13:27] = 128
    labelled[:, 27:] = 255
    root = _pair_folder(tmp_path / "d", masks={"a": labelled, "b": labelled})
    data = load_segmentation(root, 32, labels=(0, 128, 255))
    assert data.num_classes == 3 and data.images.shape == (4, 32, 32)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 2, "val": 1, "test": 1}
    want = np.asarray(Image.fromarray(labelled).resize((32, 32), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(data.masks[0].numpy(), np.searchsorted([0, 128, 255], want))
    assert data.files[0] == "images/a.png"


def _bad(root: Path, match: str, **kwargs) -> None:
    with pytest.raises(MedxferError, match=match) as info:
        load_segmentation(root, 32, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_name_the_file(tmp_path):
    root = _pair_folder(tmp_path / "size")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "b.png")
    _bad(root, r"masks/b\.png: mask size 40x30 differs from its image b\.png \(40x40\)")

    root = _pair_folder(tmp_path / "values")
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(root / "masks" / "c.png")
    _bad(root, r"masks/c\.png: mask values \[7\] outside the declared labels \[0, 255\]")

    root = _pair_folder(tmp_path / "nomask")
    (root / "masks" / "d.png").unlink()
    _bad(root, r"images/d\.png: image with no mask")

    root = _pair_folder(tmp_path / "noimage")
    (root / "images" / "a.png").unlink()
    _bad(root, r"images/a\.png: file not found")

    root = _pair_folder(tmp_path / "manifest")
    manifest = pd.DataFrame(
        {"path": ["images/a.png"], "mask": ["masks/missing.png"], "split": ["train"]}
    )
    manifest.to_csv(root / "m.csv", index=False)
    _bad(root / "m.csv", r"masks/missing\.png: file not found")

    pd.DataFrame({"path": ["images/a.png"], "split": ["train"]}).to_csv(root / "n.csv")
    _bad(root / "n.csv", r"n\.csv: no 'mask' column")
    _bad(tmp_path / "nowhere", r"nowhere: not found \(need a folder with split\.csv")
    _bad(root, "need at least two distinct", labels=(255,))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    root = _pair_folder(tmp_path / "d")
    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(root / "masks" / "a.png")
    code = main(["segment", "train", "--data", str(root), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "masks/a.png: mask values [9]" in err
    assert not (tmp_path / "r").exists()
    code = main(["segment", "train", "--data", str(root), "--out", "x", "--labels", "a,b"])
    assert code == 2 and "--labels 'a,b'" in capsys.readouterr().err
