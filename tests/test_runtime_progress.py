"""Allocator tuning (harmless, idempotent, with a visible effect on glibc) and progress lines
where there is no terminal."""

from __future__ import annotations

import ctypes
import platform

import pytest

from medxfer import progress, runtime
from medxfer.errors import MedxferError
from medxfer.progress import Lines, track

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture()
def fresh(monkeypatch):
    """A process that has not tuned its allocator yet (the flag only; malloc stays tuned)."""
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.delenv(runtime.ENV, raising=False)


def test_allocator_off_does_nothing(fresh, monkeypatch):
    monkeypatch.setenv(runtime.ENV, "default")
    result = runtime.tune_allocator()
    assert result["mode"] == "default" and result["applied"] is False
    assert runtime.allocator_status() == {"applied": False}


def test_allocator_elsewhere_than_glibc_does_nothing(fresh, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert runtime.tune_allocator() == {"allocator": "other", "mode": "tuned", "applied": False}


def test_allocator_bad_value(fresh, monkeypatch):
    monkeypatch.setenv(runtime.ENV, "jemalloc2")
    with pytest.raises(MedxferError, match="MEDXFER_ALLOCATOR"):
        runtime.tune_allocator()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_allocator_tuned_on_glibc_idempotent_and_effective(fresh):
    first = runtime.tune_allocator()
    assert first["allocator"] == "glibc" and first["applied"] is True
    assert first["settings"] == {"M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": 1 << 30}
    assert runtime.tune_allocator() == first == runtime.allocator_status()
    # The effect, seen through glibc's own statistics: a 16 MiB block (an activation buffer)
    # now comes from the heap, not from a fresh mmap, and stays there once freed.
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2()
    block = libc.malloc(16 << 20)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd  # not mmapped
    assert after.arena >= during.arena  # not trimmed back to the OS
    assert after.fordblks >= 16 << 20  # kept as free heap for the next batch


def test_progress_lines_without_a_terminal(monkeypatch):
    now = [0.0]
    lines: list[str] = []

    def tick() -> float:
        return now[0]

    monkeypatch.setattr(progress, "LINES", Lines(interval=30.0, clock=tick, write=lines.append))
    batches = [list(range(8))] * 10  # 80 images in batches of 8, 10 s per batch

    def run():
        for batch in track(batches, "features", total=80, size=len, tty=False):
            now[0] += 10.0
            yield batch

    assert sum(len(b) for b in run()) == 80
    assert lines[0] == "features: started, 80 images"
    # a line every 30 s: after batches 3, 6 and 9 (24, 48, 72 images at 0.8 img/s)
    assert lines[1:4] == [
        "features: 24/80 images, 0.8 img/s, ETA 1:10",
        "features: 48/80 images, 0.8 img/s, ETA 0:40",
        "features: 72/80 images, 0.8 img/s, ETA 0:10",
    ]
    assert lines[4] == "features: done, 80 images in 100.0 s (0.8 img/s)"
    assert len(lines) == 5


def test_progress_quiet_and_epoch_lines(monkeypatch):
    lines: list[str] = []
    now = [0.0]
    monkeypatch.setattr(
        progress, "LINES", Lines(interval=1.0, clock=lambda: now[0], write=lines.append)
    )
    assert list(track(range(3), "x", enabled=False, tty=False)) == [0, 1, 2]
    assert lines == []
    for _ in track(range(3), "epoch 1/2", total=3, phase=False, tty=False):
        now[0] += 1.0
    assert lines == [f"epoch 1/2: {k}/3 images, 1.0 img/s, ETA 0:{3 - k:02d}" for k in (1, 2, 3)]


def test_command_tunes_the_allocator_and_import_does_not(fresh, monkeypatch, capsys):
    import medxfer.cli  # noqa: F401 - importing alone changes nothing

    assert runtime.allocator_status() == {"applied": False}
    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda mode=None: calls.append(mode))
    from medxfer.cli import main

    assert main(["--allocator", "default", "models"]) == 0
    assert main(["models"]) == 0
    assert calls == ["default", None]
    assert "mobilenet_v2" in capsys.readouterr().out
