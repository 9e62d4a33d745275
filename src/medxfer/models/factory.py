"""Build an :class:`XrayClassifier` from an architecture name, a mode and a BatchNorm policy.

Modes (the paper's Remark 1): ``transfer`` (ImageNet weights, backbone frozen, new head),
``scratch`` (random init, all trainable), ``finetune`` (ImageNet weights, all trainable),
``partial`` (ImageNet weights, the last N backbone stages trainable).
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.error

import torchvision
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models.classifier import GrayToRGB, XrayClassifier
from medxfer.models.spec import (
    PAPER_ARCHS,
    PAPER_MEAN_STD,
    ModelSpec,
    default_image_size,
    is_token_model,
)
from medxfer.models.stages import StagePooling, TokenPooling, backbone_stages
from medxfer.models.weights import (
    load_weights_file,
    missing_weights_message,
    torchvision_weights,
)

__all__ = ["PAPER_ARCHS", "ModelSpec", "create_model", "default_image_size", "weights_digest"]


def create_model(spec: ModelSpec, load_weights: bool = True) -> XrayClassifier:
    """Build the classifier, load weights, apply the mode's freezing. Raises MedxferError.

    ``load_weights=False`` builds the same structure without fetching any weights (for
    restoring a trained model from its own state dict).
    """
    spec.validate()
    if load_weights:
        spec.check_files()
    if spec.arch.startswith("timm/"):
        backbone, num_features, mean_std = _timm_backbone(spec, load_weights)
    else:
        backbone, num_features, mean_std = _torchvision_backbone(spec, load_weights)
    prep = GrayToRGB(*(PAPER_MEAN_STD if spec.normalization == "paper" else mean_std))
    frozen = _apply_mode(backbone, spec)
    if spec.features == "stages":
        backbone = StagePooling(backbone, probe_size=spec.image_size or 96)
        num_features = backbone.num_features
    model = XrayClassifier(prep, backbone, num_features, spec.outputs, spec.head)
    model.frozen = frozen
    return model


def weights_digest(spec: ModelSpec) -> str:
    """A short identity of the weights a spec loads (for cache keys)."""
    if not spec.pretrained:
        return "random"
    if spec.weights:
        return _file_sha256(str(spec.weights))[:16]
    if spec.arch.startswith("timm/"):
        import timm

        cfg = timm.get_pretrained_cfg(spec.arch[5:])
        return f"timm:{spec.arch}:{cfg.hf_hub_id or cfg.url}" if cfg else f"timm:{spec.arch}"
    weights = torchvision_weights(spec.arch, spec.weights_tag)
    if weights is None:
        return "none"
    if weights.cached_path.is_file():  # its content: a file of that name may be a stand-in
        return f"{weights.filename}:{_file_sha256(str(weights.cached_path))[:16]}"
    return weights.filename


def _torchvision_backbone(spec: ModelSpec, load_weights: bool) -> tuple[nn.Module, int, tuple]:
    weights = torchvision_weights(spec.arch, spec.weights_tag)
    kwargs = {"aux_logits": True, "init_weights": False} if spec.arch == "inception_v3" else {}
    if not load_weights:
        model = torchvision.models.get_model(spec.arch, weights=None, **kwargs)
    elif spec.pretrained and not spec.weights:
        if weights is None:
            raise MedxferError(f"{spec.arch}: torchvision has no pretrained weights for it")
        try:
            model = torchvision.models.get_model(spec.arch, weights=weights.enum, **kwargs)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise MedxferError(missing_weights_message(spec.arch, weights, exc)) from None
    else:
        if spec.arch == "inception_v3" and not spec.pretrained:
            kwargs["init_weights"] = True
        model = torchvision.models.get_model(spec.arch, weights=None, **kwargs)
        if spec.weights and spec.pretrained:  # a scratch network starts from random weights
            load_weights_file(model, spec.weights, head=_last_linear(model)[0])
    if spec.arch == "inception_v3":
        # Inception's weights expect inputs scaled to [-1, 1] (the paper's normalisation);
        # ``transform_input`` converts ImageNet-normalised inputs into that range.
        model.transform_input = spec.normalization == "imagenet" and spec.pretrained
    num_features = _drop_last_linear(model, spec.outputs)
    mean_std = weights.mean_std if weights else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return model, num_features, mean_std


def _timm_backbone(spec: ModelSpec, load_weights: bool) -> tuple[nn.Module, int, tuple]:
    import timm

    name = spec.arch[5:]
    size = {"img_size": spec.image_size} if is_token_model(spec.arch) and spec.image_size else {}
    from_hub = spec.pretrained and load_weights and not spec.weights
    try:
        model = timm.create_model(name, pretrained=from_hub, num_classes=0, **size)
    except Exception as exc:  # hub errors come in many types
        cfg = timm.get_pretrained_cfg(name)
        where = f" (hub repository {cfg.hf_hub_id})" if cfg and cfg.hf_hub_id else ""
        raise MedxferError(
            f"pretrained weights for timm/{name}{where} could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); put them in the hub "
            "cache or pass a local file with --weights PATH"
        ) from None
    cfg = model.pretrained_cfg
    if spec.weights and spec.pretrained and load_weights:
        load_weights_file(model, spec.weights, head=cfg.get("classifier"))
    mean_std = (
        tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    if is_token_model(spec.arch):
        _check_tokens(model, spec)
        model = TokenPooling(model, spec.pool)
    return model, model.num_features, mean_std


def _check_tokens(model: nn.Module, spec: ModelSpec) -> None:
    """The image must tile into whole patches, and ``cls`` needs a class token."""
    patch = model.patch_embed.patch_size
    size = spec.image_size or model.patch_embed.img_size[0]
    if size % patch[0] or size % patch[1]:
        raise MedxferError(
            f"--image-size {size}: {spec.arch} cuts images into {patch[0]} px patches; use a "
            f"multiple of {patch[0]} (e.g. {patch[0] * max(1, round(size / patch[0]))})"
        )
    if spec.pool in ("cls", "both") and not model.num_prefix_tokens:
        raise MedxferError(f"--pool {spec.pool}: {spec.arch} has no class token; use mean")


def _last_linear(model: nn.Module) -> tuple[str | None, nn.Linear | None]:
    """The classifier's final Linear (Inception's auxiliary one aside) and its name."""
    name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and not n.startswith("AuxLogits"):
            name, last = n, m
    return name, last


def _drop_last_linear(model: nn.Module, outputs: int) -> int:
    """Replace the classifier's final Linear by Identity; return its input width."""
    name, last = _last_linear(model)
    if last is None:
        raise MedxferError(f"{type(model).__name__}: no final Linear layer to replace")
    model.set_submodule(name, nn.Identity())
    if hasattr(model, "AuxLogits") and model.AuxLogits is not None:
        model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, outputs)
    return last.in_features


def _apply_mode(backbone: nn.Module, spec: ModelSpec) -> list[nn.Module]:
    """Freeze what the mode keeps; returns the modules held in eval mode while training."""
    if getattr(backbone, "AuxLogits", None) is not None and (
        spec.mode == "transfer" or not spec.inception_aux
    ):
        backbone.aux_logits, backbone.AuxLogits = False, None  # a frozen probe needs no aux
    if spec.mode in ("scratch", "finetune"):
        return []
    backbone.requires_grad_(False)
    if spec.mode == "transfer":
        return [backbone] if spec.bn != "train" else []
    stages = backbone_stages(backbone)
    if spec.trainable_stages > len(stages):
        raise MedxferError(
            f"--trainable-stages {spec.trainable_stages}: {spec.arch} has only {len(stages)} stages"
        )
    for _, module in stages[-spec.trainable_stages :]:
        module.requires_grad_(True)
    if getattr(backbone, "AuxLogits", None) is not None:
        backbone.AuxLogits.requires_grad_(True)
    return [m for _, m in stages[: -spec.trainable_stages]] if spec.bn != "train" else []


def _file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, _size: int, _mtime_ns: int) -> str:
    """Hashed once per process per file version (size and mtime are part of the cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
