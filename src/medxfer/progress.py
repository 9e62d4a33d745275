"""Progress of long loops, in a terminal and in a log file alike.

On a terminal this is tqdm's bar. Without one (a batch job, ``nohup``, a study worker) tqdm
prints nothing, so a long run looked dead in its log: there a line is written when a phase
starts, one about every ``interval`` seconds with the images done, the rate and the time left,
and one when it ends. ``enabled=False`` (``--quiet``) silences both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
INTERVAL = 30.0  # seconds between progress lines in a log


@dataclass
class Lines:
    """Where and how often progress lines go when there is no terminal (tests swap these)."""

    interval: float = INTERVAL
    clock: Callable[[], float] = time.monotonic
    write: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))


LINES = Lines()


def track(
    items: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    size: Callable[[T], int] | None = None,
    enabled: bool = True,
    phase: bool = True,
    tty: bool | None = None,
) -> Iterator[T]:
    """Yield ``items`` while reporting progress. ``size(item)`` is how many images an item
    holds (a batch of indices: ``len``), ``total`` the images in all; ``phase=False`` drops
    the start and end lines in logs (the epoch loop writes its own line per epoch); ``tty``
    None: whether stderr is a terminal."""
    if not enabled:
        yield from items
        return
    if tty is None:
        tty = sys.stderr.isatty()
    if tty:
        yield from _bar(items, desc, total, size)
    else:
        yield from _lines(items, desc, total, size or (lambda _item: 1), phase)


def _bar(items, desc, total, size) -> Iterator:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, leave=False, unit="img") as bar:
        for item in items:
            yield item
            bar.update(size(item) if size else 1)


def _lines(items, desc, total, size, phase) -> Iterator:
    out = LINES
    start = last = out.clock()
    done = 0
    if phase:
        out.write(f"{desc}: started" + (f", {total} images" if total else ""))
    for item in items:
        yield item
        done += size(item)
        now = out.clock()
        if now - last >= out.interval:
            last = now
            out.write(f"{desc}: {_status(done, total, now - start)}")
    if not phase:
        return
    elapsed = out.clock() - start
    rate = done / elapsed if elapsed > 0 else float("inf")
    out.write(f"{desc}: done, {done} images in {elapsed:.1f} s ({rate:.1f} img/s)")


def _status(done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{done}" + (f"/{total}" if total else "") + f" images, {rate:.1f} img/s"
    if total and rate > 0:
        text += f", ETA {_clock((total - done) / rate)}"
    return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
