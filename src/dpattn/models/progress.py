"""A named phase with a live elapsed-time spinner on stderr, for slow steps without a count
(reading a GGUF config, building a 262k-token tokenizer): the user sees which step runs and
for how long, instead of a silent pause."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from tqdm.auto import tqdm

REFRESH_S = 0.2


@contextmanager
def phase(desc: str, enabled: bool = True, file: IO[str] | None = None) -> Iterator[None]:
    """`desc: 12s` ticking while the body runs, then `desc: done in 12.3 s`."""
    if not enabled:
        yield
        return
    out = file if file is not None else sys.stderr
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", file=out, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(REFRESH_S):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    start = time.monotonic()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
        print(f"{desc}: done in {time.monotonic() - start:.1f} s", file=out, flush=True)
