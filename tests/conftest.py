"""Shared fixtures: the real Kermany data from ../shared, small subsets of it, and an isolated
torch hub cache holding the one torchvision ImageNet file available offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KERMANY = SHARED / "data" / "chest_xray"
WEIGHTS = SHARED / "weights"
MOBILENET_FILE = WEIGHTS / "mobilenet_v2-b0353104.pth"
LITE0_FILE = WEIGHTS / "tf_efficientnet_lite0-d07c2327.pth"


def pytest_collection_modifyitems(config, items):
    if not KERMANY.is_dir():
        skip = pytest.mark.skip(reason=f"{KERMANY} not present")
        for item in items:
            if "kermany" in item.fixturenames or "small_kermany" in item.fixturenames:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Every test sees a fresh medxfer cache and a torch hub cache with MobileNet v2 only."""
    import torch

    from medxfer.models.weights import install_weights

    hub = tmp_path_factory.mktemp("torch_home")
    cache = tmp_path_factory.mktemp("medxfer_cache")
    old = {k: os.environ.get(k) for k in ("TORCH_HOME", "MEDXFER_CACHE")}
    os.environ["TORCH_HOME"], os.environ["MEDXFER_CACHE"] = str(hub), str(cache)
    torch.hub.set_dir(str(hub / "hub"))
    if MOBILENET_FILE.exists():
        install_weights(MOBILENET_FILE)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def kermany() -> Path:
    return KERMANY


def make_subset(dest: Path, per_class: dict[str, int], offset: int = 0) -> Path:
    """Copy the first N images of each class of each split of Kermany into ``dest``."""
    for split, n in per_class.items():
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((KERMANY / split / cls).iterdir())[offset : offset + n]
            target = dest / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, target / f.name)
    return dest


@pytest.fixture(scope="session")
def small_kermany(tmp_path_factory) -> Path:
    """A real subset: 24 train, 4 val, 10 test images per class."""
    return make_subset(
        tmp_path_factory.mktemp("kermany_small"), {"train": 24, "val": 4, "test": 10}
    )


@pytest.fixture()
def writable_subset(tmp_path) -> Path:
    """A small real subset the test may damage."""
    return make_subset(tmp_path / "data", {"train": 6, "test": 4})
