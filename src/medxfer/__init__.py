"""medxfer: ImageNet feature transfer vs training from scratch on medical images.

``medxfer.train``, ``medxfer.load`` and ``medxfer.run_study`` are imported on first use, so
``import medxfer`` stays light (no torch until a function is called)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MedxferError", "RunConfig", "__version__", "evaluate", "load", "run_study", "train"]

_LAZY = {
    "train": "medxfer.api",
    "load": "medxfer.api",
    "evaluate": "medxfer.api",
    "run_study": "medxfer.api",
    "RunConfig": "medxfer.config",
    "MedxferError": "medxfer.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'medxfer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
