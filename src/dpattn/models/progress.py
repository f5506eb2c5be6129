"""Progress of the slow steps on stderr (the first run's GGUF conversion): a named phase, and a
counted loop. On a terminal a live line (an elapsed-time spinner, a tqdm bar) that repaints
itself; anywhere else (a pipe, a log file, CI) plain lines instead, a few per step, since a
repainted line there becomes kilobytes of carriage returns on one line."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TypeVar

from tqdm.auto import tqdm

REFRESH_S = 0.2
T = TypeVar("T")


def interactive(out: IO[str]) -> bool:
    """Whether `out` is a terminal (repainting a line there reads as a live display)."""
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


@contextmanager
def phase(desc: str, enabled: bool = True, file: IO[str] | None = None) -> Iterator[None]:
    """`desc: 12s` ticking while the body runs (not a terminal: a `desc ...` line), then
    `desc: done in 12.3 s`."""
    if not enabled:
        yield
        return
    out = file if file is not None else sys.stderr
    bar, stop, ticker = None, threading.Event(), None
    if interactive(out):
        bar = live = tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=out, leave=False)

        def tick() -> None:
            while not stop.wait(REFRESH_S):
                live.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    else:
        print(f"{desc} ...", file=out, flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        if bar is not None:
            bar.close()
        print(f"{desc}: done in {time.monotonic() - start:.1f} s", file=out, flush=True)


def counted(
    items: Sequence[T], desc: str, enabled: bool = True, file: IO[str] | None = None
) -> Iterator[T]:
    """Iterate over items with a tqdm bar on a terminal; elsewhere a line at the start, after
    each quarter of the items, and `desc: done in 12.3 s` at the end."""
    out = file if file is not None else sys.stderr
    if not enabled or interactive(out):
        yield from tqdm(items, desc=desc, file=out, disable=not enabled)
        return
    total = len(items)
    print(f"{desc}: 0/{total} ...", file=out, flush=True)
    marks = {total * q // 4 for q in (1, 2, 3)}
    start = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if i in marks and i < total:
            elapsed = time.monotonic() - start
            print(f"{desc}: {i}/{total}, {elapsed:.1f} s", file=out, flush=True)
    print(f"{desc}: done in {time.monotonic() - start:.1f} s", file=out, flush=True)
