"""medxfer: ImageNet feature transfer vs training from scratch on medical images."""

__version__ = "0.1.0"
