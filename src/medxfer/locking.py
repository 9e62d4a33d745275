"""Exclusive locks on files, so that two medxfer processes never write the same run folder.

``fcntl.flock`` is released by the kernel when its process dies, even by ``kill -9``, so a lock
never outlives a crash. The lock file holds the holder's pid, for the message of whoever is
refused, and is removed on release; a process that opened the file just before it was removed
notices (the path no longer names the file it locked) and tries again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medxfer.errors import MedxferError


class LockHeld(MedxferError):
    """Another process holds the lock; ``pid`` is its process id (None if not yet written)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


@contextmanager
def exclusive_lock(
    path: str | os.PathLike, *, busy: str = "{path}: locked by another medxfer process (pid {pid})"
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing), or raise LockHeld at once with
    the message ``busy`` (``{path}`` and ``{pid}`` filled in)."""
    path = Path(path)
    fd = _acquire(path, busy)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock: see the module docstring
        os.close(fd)


def run_folder_lock(out: str | os.PathLike):
    """Lock the run folder ``out`` for training. The lock file is ``.NAME.lock`` beside the
    folder, so that the folder itself stays untouched until the run's input is known good.
    The path is resolved first: ``.`` and ``/abs/run`` are one folder and must be one lock."""
    out, where = Path(out), Path(out).resolve()
    return exclusive_lock(
        where.parent / f".{where.name}.lock",
        busy=f"{out}: another medxfer process is training into this folder (pid {{pid}})",
    )


def _acquire(path: Path, busy: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            message = busy.replace("{path}", str(path)).replace("{pid}", str(pid or "unknown"))
            raise LockHeld(message, pid) from None
        if _names(path, fd):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock


def _names(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
