"""Transformers (timm ViTs, DINOv2) as backbones, from stand-in weight files of the right keys
and shapes (no real ViT weights are reachable offline): position embeddings resized, pooled
tokens, grouped stages, torch = onnxruntime, transfer and finetune end to end, a study that
mixes them with a CNN, and a weights file that does not fit refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.models.factory import create_model
from medxfer.models.spec import ModelSpec
from medxfer.models.stages import backbone_stages

DINO = "timm/vit_small_patch14_dinov2"
VIT_B = "timm/vit_base_patch16_224"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """State dicts as the hub releases them: DINOv2-small at its 518 px, ViT-B/16 at 224."""
    root = tmp_path_factory.mktemp("vit_weights")
    files = {}
    for arch in (DINO, VIT_B):
        torch.manual_seed(0)
        model = timm.create_model(arch[5:], pretrained=False)
        files[arch] = root / f"{arch[5:]}.pth"
        torch.save(model.state_dict(), files[arch])
    return files


def test_position_embeddings_are_resized_and_tokens_pooled(weights):
    from timm.layers import resample_abs_pos_embed

    spec = ModelSpec(DINO, weights=str(weights[DINO]), image_size=56, pool="both")
    model = create_model(spec)
    vit = model.backbone.network
    original = torch.load(weights[DINO], weights_only=True)["pos_embed"]
    # the reference: timm's own resampling of the 37 x 37 grid to 4 x 4 (the class token kept)
    want = resample_abs_pos_embed(original, (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(vit.pos_embed, want)
    assert model.num_features == 2 * 384
    x = torch.rand(2, 1, 56, 56)
    with torch.inference_mode():
        tokens = vit.forward_features(model.prep(x))
        pooled = model.features(x)
    torch.testing.assert_close(pooled, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1))
    names = [n for n, _ in backbone_stages(model.backbone)]
    assert names == [
        "network.patch_embed",
        *(f"network.blocks.{i}" for i in (2, 5, 8, 11)),
        "network.norm",
    ]


def test_transformer_features_in_torch_and_onnxruntime_agree(weights, tmp_path):
    from medxfer.engine import OnnxEngine

    for arch, size in ((DINO, 56), (VIT_B, 64)):
        spec = ModelSpec(arch, weights=str(weights[arch]), image_size=size, features="stages")
        model = create_model(spec).eval()
        x = torch.rand(3, 1, size, size)
        with torch.inference_mode():
            want = model.features(x)
        got = OnnxEngine(model, tmp_path).features(x)
        assert want.shape[1] == (384 if arch == DINO else 768) * 3
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_a_weights_file_that_does_not_fit_is_refused(weights, tmp_path, capsys, small_kermany):
    import torchvision

    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    out = tmp_path / "run"
    args = ["train", "--data", str(small_kermany), "--out", str(out), "--arch", DINO]
    assert main([*args, "--weights", str(resnet), "--image-size", "56"]) == 2
    err = capsys.readouterr().err
    assert (
        "missing keys, first 'cls_token'" in err and "unexpected keys, first 'conv1.weight'" in err
    )
    assert not out.exists()
    with pytest.raises(MedxferError, match="--pool both: mobilenet_v2 is not a transformer"):
        ModelSpec("mobilenet_v2", pool="both").validate()
    from medxfer.segmentation.options import SegmentationOptions

    with pytest.raises(MedxferError, match="segmentation needs a backbone with feature maps"):
        SegmentationOptions(data="d", out="o", arch=DINO).validate()


@pytest.mark.integration
@pytest.mark.parametrize(
    "arch, mode, size", [(DINO, "transfer", 56), (DINO, "finetune", 56), (VIT_B, "transfer", 64)]
)
def test_transformer_runs_end_to_end(weights, small_kermany, tmp_path, arch, mode, size):
    run = tmp_path / "run"
    args = ["train", "--data", str(small_kermany), "--out", str(run), "--arch", arch]
    args += ["--weights", str(weights[arch]), "--mode", mode, "--image-size", str(size)]
    args += ["--epochs", "1", "--bootstrap", "0", "--limit-per-class", "12", "--quiet"]
    assert main([*args, "--pool", "both"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["arch"] == arch and 0 <= metrics["test"]["roc_auc"] <= 1
    config = json.loads((run / "config.json").read_text())["run"]
    assert config["pool"] == "both"
    image = next((small_kermany / "test" / "PNEUMONIA").iterdir())
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(image), "--out", str(out)]) == 0
    predicted = pd.read_csv(run / "predictions.csv").set_index("file")
    if str(image) in predicted.index:  # the same image through predict and through the run
        got = float(pd.read_csv(out).probability[0])
        assert got == pytest.approx(float(predicted.loc[str(image), "probability"]), abs=1e-4)


@pytest.mark.integration
def test_a_study_compares_a_cnn_with_a_transformer(small_kermany, tmp_path):
    spec = tmp_path / "study.toml"
    spec.write_text(
        f'[study]\nname = "mix"\ncompare = ["arch"]\n\n[base]\ndata = "{small_kermany}"\n'
        'mode = "scratch"\n'
        "image_size = 56\nepochs = 1\nbootstrap = 20\nlimit_per_class = 12\n\n[grid]\n"
        f'arch = ["mobilenet_v2", "{DINO}"]\nseed = [0]\n'
    )
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--out", str(out)]) == 0
    comparisons = pd.read_csv(out / "comparisons.csv")
    auc = comparisons[(comparisons.option == "arch") & (comparisons.metric == "roc_auc")]
    assert len(auc) == 1 and auc.p_value.notna().all() and auc["test"].iloc[0] == "DeLong"
    assert main(["report", str(out)]) == 0


def test_weight_files_as_encoders_ship_them(weights, tmp_path):
    """Found by an outside review: a Lightning-style ``model.`` prefix, torchxrayvision's
    ``op_threshs`` buffer and its one-channel stem load; a broken position embedding and a
    whole pickled model are one line each."""
    import torchvision

    net = torchvision.models.densenet121()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state["model.features.conv0.weight"] = net.features.conv0.weight[:, :1].clone()
    state["model.op_threshs"] = torch.rand(18)
    state["model.classifier.weight"] = torch.rand(18, 1024)
    state["model.classifier.bias"] = torch.rand(18)
    path = tmp_path / "xrv.pth"
    torch.save({"state_dict": state}, path)
    model = create_model(ModelSpec("densenet121", weights=str(path))).eval()
    gray = torch.rand(2, 1, 64, 64)
    stem = model.backbone.features.conv0
    want = torch.nn.functional.conv2d(
        model.prep(gray)[:, :1], state["model.features.conv0.weight"], stride=2, padding=3
    )
    torch.testing.assert_close(stem(model.prep(gray)), want, rtol=1e-5, atol=1e-5)

    broken = torch.load(weights[DINO], weights_only=True)
    broken["pos_embed"] = torch.rand(1, 40, 384)
    torch.save(broken, tmp_path / "badpos.pth")
    with pytest.raises(MedxferError, match=r"badpos\.pth: weights do not fit VisionTransformer"):
        create_model(ModelSpec(DINO, weights=str(tmp_path / "badpos.pth"), image_size=56))
    torch.save(torchvision.models.resnet18(), tmp_path / "whole.pth")
    with pytest.raises(MedxferError, match=r"whole\.pth: cannot read weights") as info:
        create_model(ModelSpec("resnet18", weights=str(tmp_path / "whole.pth")))
    assert "\n" not in str(info.value)


def test_pool_sizes_and_cam_are_checked_and_the_pool_keys_the_caches(weights, tmp_path):
    from medxfer.engine import graph_key
    from medxfer.inference.cam import target_layer

    with pytest.raises(MedxferError, match=r"--image-size 50: .* 14 px patches; use a multiple"):
        create_model(ModelSpec(DINO, weights=str(weights[DINO]), image_size=50))
    own = create_model(ModelSpec(DINO, weights=str(weights[DINO]), image_size=56)).eval()
    mean = create_model(ModelSpec(DINO, weights=str(weights[DINO]), image_size=56, pool="mean"))
    x = torch.rand(2, 1, 56, 56)
    with torch.inference_mode():
        vit = own.backbone.network
        want = vit.forward_head(vit.forward_features(own.prep(x)), pre_logits=True)
        torch.testing.assert_close(own.features(x), want)  # the model's own pooling
    shape = (1, 56, 56)
    assert graph_key(own.backbone, shape) != graph_key(mean.eval().backbone, shape)
    with pytest.raises(MedxferError, match="Grad-CAM: a transformer"):
        target_layer(own)
    staged = create_model(
        ModelSpec(DINO, weights=str(weights[DINO]), image_size=56, features="stages")
    )
    names = [n for n, _ in backbone_stages(staged.backbone)]
    assert "network.network.blocks.11" in names  # the similarity measures see the blocks
