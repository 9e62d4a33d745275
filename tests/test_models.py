import pytest
import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.factory import create_model
from medxfer.models.spec import PAPER_ARCHS, ModelSpec
from medxfer.models.stages import backbone_stages
from tests.conftest import LITE0_FILE


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_paper_architectures_build_with_one_logit(arch):
    model = create_model(ModelSpec(arch, mode="scratch")).eval()
    size = 75 if arch == "inception_v3" else 32
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2,)
    assert isinstance(model.head.linear, nn.Linear) and model.head.linear.out_features == 1


def test_inception_training_returns_aux_logits():
    model = create_model(ModelSpec("inception_v3", mode="scratch")).train()
    logits, aux = model(torch.rand(2, 1, 299, 299))
    assert logits.shape == aux.shape == (2,)


def test_transfer_freezes_backbone_and_keeps_bn_in_eval():
    model = create_model(ModelSpec("mobilenet_v2", mode="transfer"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.linear.weight", "head.linear.bias"}
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_transfer_with_bn_train_uses_batch_statistics():
    model = create_model(ModelSpec("mobilenet_v2", mode="transfer", bn="train")).train()
    assert all(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_partial_unfreezes_last_stages():
    model = create_model(ModelSpec("mobilenet_v2", mode="partial", trainable_stages=2))
    stages = backbone_stages(model.backbone)
    names = [n for n, _ in stages]
    assert names[-2:] == ["features.17", "features.18"]
    for name, module in stages:
        expected = name in names[-2:]
        assert all(p.requires_grad == expected for p in module.parameters()), name
    model.train()
    assert not stages[0][1].training and stages[-1][1].training


def test_pretrained_weights_are_loaded():
    a = create_model(ModelSpec("mobilenet_v2", mode="finetune"))
    b = create_model(ModelSpec("mobilenet_v2", mode="finetune"))
    torch.testing.assert_close(a.backbone.features[0][0].weight, b.backbone.features[0][0].weight)
    scratch = create_model(ModelSpec("mobilenet_v2", mode="scratch"))
    assert not torch.allclose(
        a.backbone.features[0][0].weight, scratch.backbone.features[0][0].weight
    )


def test_missing_weights_name_the_file():
    with pytest.raises(MedxferError, match=r"resnet18-f37072fd\.pth into .*checkpoints"):
        create_model(ModelSpec("resnet18", mode="transfer"))


def test_unknown_architecture():
    with pytest.raises(MedxferError, match="unknown architecture 'resnet9000'"):
        create_model(ModelSpec("resnet9000"))
    with pytest.raises(MedxferError, match="unknown timm architecture"):
        create_model(ModelSpec("timm/not_a_net"))


@pytest.mark.skipif(not LITE0_FILE.exists(), reason="EfficientNet-Lite0 weights not present")
def test_timm_model_from_local_weights():
    model = create_model(ModelSpec("timm/tf_efficientnet_lite0", weights=str(LITE0_FILE)))
    assert model.num_features == 1280
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.linear.weight",
        "head.linear.bias",
    }
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 1, 64, 64)).shape == (1,)


def test_gray_replication_and_normalisation():
    model = create_model(ModelSpec("mobilenet_v2", mode="scratch"))
    rgb = model.prep(torch.full((1, 1, 4, 4), 0.75))
    assert rgb.shape == (1, 3, 4, 4) and torch.allclose(rgb, torch.full_like(rgb, 0.5))
