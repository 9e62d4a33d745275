"""Process-wide tuning that the ``medxfer`` command applies at start-up, and only it.

glibc's malloc returns every large block (above a dynamic mmap threshold of 128 KiB to 32 MiB)
to the operating system when it is freed. A CNN forward pass allocates and frees activation
buffers of several MiB on every batch, so each batch pays for fresh pages: on a 2-core machine
a cold main job spent 197 s of 654 s CPU time in the kernel on 59 M minor page faults, and
PyTorch ran MobileNet v2 at 35-38 img/s instead of 69-87 img/s. Raising the mmap and trim
thresholds to 1 GiB keeps freed buffers in the heap for the next batch (see benchmarks/).

``import medxfer`` changes nothing; ``tune_allocator()`` is called by ``medxfer.cli.main``.
``MEDXFER_ALLOCATOR=default`` (or ``medxfer --allocator default``) leaves the allocator alone.
Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "MEDXFER_ALLOCATOR"
CHOICES = ("tuned", "default")
# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30

_applied: dict | None = None


def tune_allocator(mode: str | None = None) -> dict:
    """Keep freed activation buffers in the heap (glibc ``mallopt``); return what was done:
    ``{"allocator": "glibc" | "other", "mode": ..., "applied": bool, "settings": {...}}``.

    ``mode`` ``tuned`` (the default) or ``default``; None reads ``$MEDXFER_ALLOCATOR``.
    Idempotent: the first call that tunes decides, later calls return the same answer.
    """
    global _applied
    mode = mode or os.environ.get(ENV) or "tuned"
    if mode not in CHOICES:
        from medxfer.errors import MedxferError

        raise MedxferError(f"{ENV}={mode!r}: choose from {', '.join(CHOICES)}")
    if _applied is not None:
        return dict(_applied)
    libc = _glibc()
    result = {"allocator": "glibc" if libc else "other", "mode": mode, "applied": False}
    if libc is None or mode == "default":
        return result
    settings = {"M_MMAP_THRESHOLD": THRESHOLD, "M_TRIM_THRESHOLD": THRESHOLD}
    codes = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD}
    ok = {name: bool(libc.mallopt(codes[name], value)) for name, value in settings.items()}
    result.update(applied=all(ok.values()), settings={k: v for k, v in settings.items() if ok[k]})
    _applied = result
    return dict(result)


def allocator_status() -> dict:
    """What ``tune_allocator`` did in this process (for config.json's environment)."""
    return dict(_applied) if _applied is not None else {"applied": False}


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the only one whose ``mallopt`` we know), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
