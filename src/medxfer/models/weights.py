"""Where ImageNet weights come from: torchvision weight enums (torch hub cache) and timm's
pretrained config, or a local file. Nothing here downloads by other means."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models import get_model_weights

from medxfer.models.spec import DEFAULT_TAG


@dataclass(frozen=True)
class TorchvisionWeights:
    enum: object  # a torchvision WeightsEnum member

    @property
    def filename(self) -> str:
        return os.path.basename(self.enum.url)  # type: ignore[attr-defined]

    @property
    def cached_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        t = self.enum.transforms()  # type: ignore[attr-defined]
        return tuple(t.mean), tuple(t.std)


def torchvision_weights(arch: str, tag: str = DEFAULT_TAG) -> TorchvisionWeights | None:
    """The weights enum member ``tag`` of ``arch`` (its DEFAULT if it has no such tag)."""
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        return None
    members = list(enum)
    if not members:
        return None
    try:
        return TorchvisionWeights(enum[tag])
    except KeyError:
        return TorchvisionWeights(enum.DEFAULT)


def missing_weights_message(arch: str, weights: TorchvisionWeights, cause: BaseException) -> str:
    return (
        f"ImageNet weights for {arch} are not available here and could not be downloaded "
        f"({type(cause).__name__}): put {weights.filename} into {weights.cached_path.parent}/ "
        f"(from {weights.enum.url}), or pass --weights PATH"  # type: ignore[attr-defined]
    )


def install_weights(path: Path) -> Path:
    """Copy a torchvision weights file (``name-<sha256 prefix>.pth``) into torch's hub cache,
    after checking its hash against the prefix in its name, as torchvision does on load."""
    import hashlib
    import re
    import shutil

    from medxfer.errors import MedxferError

    path = Path(path)
    if not path.is_file():
        raise MedxferError(f"{path}: file not found")
    match = re.search(r"-([a-f0-9]{8,})\.", path.name)
    if not match:
        raise MedxferError(f"{path}: not a torchvision weights file name (name-<hash>.pth)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise MedxferError(f"{path}: sha256 {digest[:12]}... does not match its name")
    target = Path(torch.hub.get_dir()) / "checkpoints" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = target.with_suffix(".partial")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
    return target
