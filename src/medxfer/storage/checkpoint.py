"""Reading the checkpoint of an interrupted run, so that a damaged one means a fresh start."""

from __future__ import annotations

import os
from pathlib import Path

from medxfer.errors import warn

REQUIRED = ("state", "model")


def load_checkpoint_or_none(path: str | os.PathLike) -> dict | None:
    """The checkpoint saved at ``path``, or None if there is none or it cannot be read.

    A damaged checkpoint (a truncated write, a disk error, a file from elsewhere) costs only the
    epochs it held: it is reported in one warning line and the run starts again from epoch 0.
    """
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch, zipfile and pickle raise many types for a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warn(f"{path}: unreadable checkpoint ({reason}); starting the run afresh")
        return None
    if not isinstance(saved, dict) or not all(k in saved for k in REQUIRED):
        warn(f"{path}: not a medxfer checkpoint; starting the run afresh")
        return None
    return saved
