"""What model a run builds, as plain values: importable without torch, so a run's configuration
can be built and checked before any heavy library loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medxfer.errors import MedxferError

PAPER_ARCHS = (
    "resnet18",
    "resnet50",
    "densenet161",
    "shufflenet_v2_x1_0",
    "mobilenet_v2",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "inception_v3",
)
MODES = ("transfer", "scratch", "finetune", "partial")
BN_POLICIES = ("frozen", "adapt", "train")
NORMALIZATIONS = ("paper", "imagenet")
PAPER_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DEFAULT_TAG = "IMAGENET1K_V1"  # what `pretrained=True` meant; the weights the paper used


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    mode: str = "transfer"
    bn: str = "frozen"
    trainable_stages: int = 1
    normalization: str = "paper"
    weights: str | None = None  # a local weights file instead of the standard download
    weights_tag: str = DEFAULT_TAG
    inception_aux: bool = True  # Inception v3's auxiliary classifier (needs >= 299 px inputs)
    outputs: int = 1  # width of the head: 1 (binary) or one per class / label
    head: str = "linear"  # linear (the paper's, and logreg's), or mlp (one hidden layer)
    features: str = "last"  # last: the pooled last stage; stages: the last three, pooled
    pool: str | None = None  # token models (ViTs): cls, mean (patch tokens) or both
    image_size: int | None = None  # token models are built for it (position embeddings)

    @property
    def pretrained(self) -> bool:
        return self.mode != "scratch"

    @property
    def has_frozen_layers(self) -> bool:
        """Whether some backbone layers keep ImageNet weights (the BatchNorm policy applies)."""
        return self.mode in ("transfer", "partial")

    def validate(self) -> None:
        """Check the values; names of architectures are checked against torchvision / timm."""
        choices = (("mode", MODES), ("bn", BN_POLICIES), ("normalization", NORMALIZATIONS))
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                flag = "normalize" if name == "normalization" else name
                raise MedxferError(
                    f"--{flag} {value!r}: unknown (choose from {', '.join(allowed)})"
                )
        if self.mode == "partial" and self.trainable_stages < 1:
            raise MedxferError("--trainable-stages must be at least 1 in partial mode")
        if self.outputs < 1:
            raise MedxferError("a model needs at least one output")
        check_arch(self.arch)
        fixed = self.arch.startswith("vit_") and self.image_size not in (None, 224)
        if fixed:  # torchvision's ViTs are built for 224 px and take nothing else
            raise MedxferError(
                f"--image-size {self.image_size}: torchvision's {self.arch} takes 224 px only; "
                "use --image-size 224, or a timm ViT (timm/vit_base_patch16_224) at any size"
            )
        if self.pool is not None and not is_token_model(self.arch):
            raise MedxferError(
                f"--pool {self.pool}: {self.arch} is not a transformer with tokens to pool "
                "(a CNN's features are its global average pool)"
            )

    def check_files(self) -> None:
        """Files a training run needs (not needed to reload a trained model)."""
        if self.pretrained and self.weights and not Path(self.weights).is_file():
            raise MedxferError(f"{self.weights}: weights file not found")


TOKEN_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva", "beit")
POOLS = ("cls", "mean", "both")


def is_token_model(arch: str) -> bool:
    """A timm transformer whose backbone returns tokens (ViT, DeiT, EVA, BEiT, DINOv2)."""
    if not arch.startswith("timm/") or arch.startswith("timm/hf_hub:"):
        return False
    from timm.models import is_model_in_modules

    return is_model_in_modules(arch[5:], list(TOKEN_MODULES))


def check_feature_maps(arch: str, task: str) -> None:
    """Segmentation and detection tap feature maps at strides 4-32: a CNN's."""
    if is_token_model(arch):
        raise MedxferError(
            f"--arch {arch}: {task} needs a backbone with feature maps (a CNN); a transformer "
            "gives tokens"
        )


def check_arch(arch: str) -> None:
    if arch.startswith("timm/"):
        import timm

        if not timm.is_model(arch[5:]):
            raise MedxferError(f"unknown timm architecture {arch[5:]!r}")
        return
    if arch not in torchvision_archs():
        raise MedxferError(
            f"unknown architecture {arch!r}: use a torchvision classifier name "
            f"(see `medxfer models`) or timm/NAME"
        )


def torchvision_archs() -> list[str]:
    """torchvision's classifier names (torchvision imported only when asked)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def default_image_size(arch: str) -> int:
    return 299 if arch == "inception_v3" else 224
