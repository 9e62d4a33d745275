"""Models: backbones by name (torchvision, timm), the gray-input classifier, training modes."""

from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import PAPER_ARCHS, ModelSpec, create_model

__all__ = ["PAPER_ARCHS", "ModelSpec", "XrayClassifier", "create_model"]
