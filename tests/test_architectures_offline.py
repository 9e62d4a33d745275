"""Every paper architecture in ``transfer`` and ``finetune`` mode, offline.

Torchvision's weight enums load a file found in torch's hub cache under the enum's file name
without downloading it (the sha256 prefix in the name is checked on download only). Each test
therefore writes a stand-in state dict of the right keys and shapes (a freshly built network with
randomised BatchNorm statistics) under that name into its own hub cache, then trains on a small
real subset and checks that the backbone starts from exactly the file's tensors, stays frozen in
``transfer`` (BatchNorm statistics included) and trains in ``finetune``, and that the new head
trains in both. timm models go through timm's pretrained config with a local file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision

from medxfer.classification.run import train
from medxfer.config import RunConfig
from medxfer.models.factory import create_model
from medxfer.models.spec import PAPER_ARCHS
from medxfer.models.weights import torchvision_weights
from medxfer.storage.folder import RunFolder
from tests.conftest import LITE0_FILE, make_subset

pytestmark = pytest.mark.integration

# more than ~20 M parameters: minutes, not seconds, on two CPU cores (deselect: -m "not heavy")
HEAVY = {"resnet50", "densenet161", "resnext50_32x4d", "wide_resnet50_2", "inception_v3"}
MODES = ("transfer", "finetune")


@pytest.fixture(scope="module")
def tiny_kermany(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("tiny"), {"train": 6, "test": 3})


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch) -> Path:
    """A torch hub cache of this test's own: the session's (with the real MobileNet v2 file)
    stays as it was."""
    old = torch.hub.get_dir()
    hub = tmp_path / "torch_home" / "hub"
    monkeypatch.setenv("TORCH_HOME", str(hub.parent))
    torch.hub.set_dir(str(hub))
    yield hub
    torch.hub.set_dir(old)


def _stand_in(arch: str) -> dict[str, torch.Tensor]:
    """A state dict with the keys and shapes of ``arch``'s ImageNet file, values unlike any
    medxfer would make itself (another seed; BatchNorm statistics away from 0 and 1)."""
    torch.manual_seed(1234)
    kwargs = {"aux_logits": True, "init_weights": False} if arch == "inception_v3" else {}
    state = torchvision.models.get_model(arch, weights=None, **kwargs).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    return state


def _config(arch: str, mode: str, data: Path, tmp_path: Path, **extra) -> RunConfig:
    return RunConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        arch=arch,
        mode=mode,
        image_size=75 if arch == "inception_v3" else 32,
        epochs=1,
        batch_size=12,
        val_fraction=0,
        augment="none",
        bootstrap=0,
        cache_dir=str(tmp_path / "cache"),
        **extra,
    )


def _initial_network(cfg: RunConfig):
    """The network as the run builds it before training (same seed, same spec)."""
    torch.manual_seed(cfg.seed)
    return create_model(replace(cfg.model_spec, outputs=1))


def _check_run(cfg: RunConfig, file_state: dict[str, torch.Tensor]) -> None:
    """Start exactly at the file, train the head, freeze (transfer) or train (finetune) the
    backbone."""
    initial = _initial_network(cfg)
    backbone = {k: v for k, v in initial.backbone.state_dict().items()}
    # every tensor of the file is in the backbone but the replaced classifier (and Inception's
    # auxiliary classifier, dropped below 299 px and in transfer mode)
    left = {k for k in set(file_state) - set(backbone) if not k.startswith("AuxLogits.")}
    assert len(left) == 2 and all(k.endswith((".weight", ".bias")) for k in left), left
    assert left <= {
        f"{n}.{p}" for n in ("fc", "classifier", "classifier.1") for p in ("weight", "bias")
    }
    for key, value in backbone.items():
        assert torch.equal(value, file_state[key]), f"{cfg.arch}: {key} is not the file's"
    frozen = cfg.mode == "transfer"
    assert all(p.requires_grad != frozen for p in initial.backbone.parameters())
    assert all(p.requires_grad for p in initial.head.parameters())

    run = train(cfg, progress=False, log=lambda _: None)
    trained = torch.load(run / RunFolder.MODEL, weights_only=False)["state_dict"]
    for key, value in initial.head.state_dict().items():
        assert not torch.equal(trained[f"head.{key}"], value), f"head {key} did not train"
    changed = [k for k, v in backbone.items() if not torch.equal(trained[f"backbone.{k}"], v)]
    params = {n for n, _ in initial.backbone.named_parameters()}
    if frozen:
        assert changed == [], f"{cfg.arch}: frozen backbone changed: {changed[:3]}"
    else:
        # every parameter tensor moves, and BatchNorm statistics follow the X-rays
        assert params <= set(changed), sorted(params - set(changed))[:3]
        stats = [k for k in backbone if k.endswith("running_mean")]
        assert not stats or set(stats) <= set(changed)
    assert run.read_metrics()["mode"] == cfg.mode


def _marks(arch: str):
    return [pytest.mark.heavy] if arch in HEAVY else []


@pytest.mark.parametrize(
    ("arch", "mode"),
    [pytest.param(a, m, marks=_marks(a)) for a in PAPER_ARCHS for m in MODES],
)
def test_paper_architecture_offline(arch, mode, hub_dir, tiny_kermany, tmp_path):
    weights = torchvision_weights(arch)
    file_state = _stand_in(arch)
    target = hub_dir / "checkpoints" / weights.filename
    target.parent.mkdir(parents=True)
    torch.save(file_state, target)
    assert weights.cached_path == target  # medxfer looks where torchvision looks
    _check_run(_config(arch, mode, tiny_kermany, tmp_path), file_state)


@pytest.mark.skipif(not LITE0_FILE.exists(), reason=f"{LITE0_FILE} not present")
@pytest.mark.parametrize("mode", MODES)
def test_timm_architecture_from_a_local_file(mode, hub_dir, tiny_kermany, tmp_path):
    """timm's pretrained config with ``--weights`` pointing at the real ImageNet file."""
    cfg = _config(
        "timm/tf_efficientnet_lite0", mode, tiny_kermany, tmp_path, weights=str(LITE0_FILE)
    )
    file_state = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    _check_run(cfg, file_state)
    assert not any(hub_dir.rglob("*.pth")) and not any(hub_dir.rglob("*.safetensors"))
