"""Where ImageNet weights come from: torchvision weight enums (torch hub cache) and timm's
pretrained config, or a local file. Nothing here downloads by other means."""

from __future__ import annotations

import importlib
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


def load_weights_file(model: torch.nn.Module, path: str, head: str | None) -> None:
    """Load a local state dict (``--weights FILE``: a torchvision-, timm- or plain PyTorch
    file, e.g. an X-ray-pretrained encoder) into ``model``, refusing a file whose keys do not
    fit: every key of the network must be there with its shape. Keys of the classifier
    ``head`` (replaced by medxfer's own head) and known extra buffers are dropped; a prefix
    every key shares (``module.``, ``model.``), a timm model's own checkpoint filter (e.g.
    resizing ViT position embeddings) and a one-channel stem are handled first."""
    from medxfer.errors import MedxferError

    state = _without_wrappers(_read_state(path))
    state = {k: v for k, v in state.items() if k not in EXTRA_KEYS}
    filter_fn = getattr(
        importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None
    )
    if filter_fn is not None and type(model).__module__.startswith("timm."):
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # a malformed tensor (say, position embeddings) fails here
            raise MedxferError(
                f"{path}: weights do not fit {type(model).__name__} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]})"
            ) from None
    if head:
        state = {k: v for k, v in state.items() if k != head and not k.startswith(head + ".")}
    own = model.state_dict()
    state = _gray_stems(state, own)
    missing = [k for k in own if k not in state and not _is_head(k, head)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[0]!r}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{k!r} is {tuple(state[k].shape)}, the network needs {tuple(own[k].shape)}"
            )
        raise MedxferError(
            f"{path}: weights do not fit {type(model).__name__} ({'; '.join(parts)})"
        )
    model.load_state_dict({**{k: v for k, v in own.items() if _is_head(k, head)}, **state})


# buffers some X-ray encoders store beside their weights (torchxrayvision's per-finding
# operating thresholds): not part of any network medxfer builds
EXTRA_KEYS = ("op_threshs",)
WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "backbone.")  # DataParallel, Lightning


def _without_wrappers(state: dict) -> dict:
    """Strip a prefix that every key shares (``module.`` of DataParallel, ``model.`` of a
    Lightning module, ...), repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return state


def _gray_stems(state: dict, own: dict) -> dict:
    """A stem convolution trained on one gray channel (X-ray encoders) made to take medxfer's
    replicated RGB input: the weights repeated over three channels and divided by three, which
    gives the same output on R = G = B."""
    out = dict(state)
    for key, tensor in state.items():
        mine = own.get(key)
        if (
            mine is not None
            and tensor.ndim == 4
            and tensor.shape[1] == 1
            and mine.shape[1] == 3
            and tensor.shape[:1] + tensor.shape[2:] == mine.shape[:1] + mine.shape[2:]
        ):
            out[key] = tensor.repeat(1, 3, 1, 1) / 3
    return out


def _is_head(key: str, head: str | None) -> bool:
    return bool(head) and (key == head or key.startswith(f"{head}."))


def _read_state(path: str) -> dict:
    from medxfer.errors import MedxferError

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles, zip archives and safetensors fail in their own ways
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise MedxferError(
            f"{path}: cannot read weights ({type(exc).__name__}: {first}); a state dict of "
            "tensors is needed (save model.state_dict())"
        ) from None
    for wrapper in ("state_dict", "model"):  # Lightning- and trainer-style checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedxferError(f"{path}: not a state dict of tensors (save model.state_dict())")
    return state


# Self-supervised and supervised transformers the README names (``medxfer models --all``):
# timm names with their pretrained tags, weights from the Hugging Face hub cache.
TRANSFORMERS = (
    "timm/vit_small_patch14_dinov2.lvd142m",
    "timm/vit_base_patch14_dinov2.lvd142m",
    "timm/vit_small_patch16_224.dino",
    "timm/vit_base_patch16_224.dino",
    "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "timm/deit_small_patch16_224.fb_in1k",
)


def hub_weights(arch: str) -> tuple[str | None, bool]:
    """(hub repository, whether its weights are in the local hub cache) of ``timm/NAME``."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(arch.removeprefix("timm/"))
    repo = cfg.hf_hub_id if cfg else None
    if repo is None:
        return None, False
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    names += ["model.safetensors", "pytorch_model.bin"]
    return repo, any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
