"""Decode side: prefill look-ups and heartbeats, on a background thread.

The rank loop never blocks on HTTP: it asks `ranks(addr)` (None until the prefill server's
ranks are all registered) and `dead(addr)` (why the prefill server is considered gone). A
server that misses MISSES_TO_DIE heartbeats in a row is dead until it answers again.
"""

from __future__ import annotations

import threading

from dpattn.disaggregation.bootstrap import fetch_ranks, is_alive
from dpattn.disaggregation.layout import RankInfo

MISSES_TO_DIE = 2

Addr = tuple[str, int]


class PrefillLiveness:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._watched: dict[Addr, int] = {}  # address -> requests that need it
        self._ranks: dict[Addr, list[RankInfo]] = {}
        self._misses: dict[Addr, int] = {}
        self._dead: dict[Addr, str] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prefill-liveness")
        self._thread.start()

    def watch(self, addr: Addr) -> None:
        with self._lock:
            self._watched[addr] = self._watched.get(addr, 0) + 1
        self._wake.set()  # a new address: look it up now, not after the interval

    def unwatch(self, addr: Addr) -> None:
        with self._lock:
            left = self._watched.get(addr, 0) - 1
            if left > 0:
                self._watched[addr] = left
            else:
                self._watched.pop(addr, None)

    def ranks(self, addr: Addr) -> list[RankInfo] | None:
        with self._lock:
            return self._ranks.get(addr)

    def dead(self, addr: Addr) -> str | None:
        with self._lock:
            return self._dead.get(addr)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                addrs = list(self._watched)
            for addr in addrs:
                self._check(addr)
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _check(self, addr: Addr) -> None:
        host, port = addr
        timeout = max(0.5, self.interval_s)
        ranks, error = None, ""
        alive = is_alive(host, port, timeout)
        if alive and self.ranks(addr) is None:
            try:
                ranks = fetch_ranks(host, port, timeout)
            except (OSError, ValueError, KeyError) as e:
                error = str(e)
        with self._lock:
            if ranks is not None:
                self._ranks[addr] = ranks
            if alive:
                self._misses[addr] = 0
                self._dead.pop(addr, None)
                return
            self._misses[addr] = self._misses.get(addr, 0) + 1
            if self._misses[addr] >= MISSES_TO_DIE:
                self._ranks.pop(addr, None)  # a restarted server registers anew
                self._dead[addr] = (
                    f"prefill server {host}:{port} is gone (its bootstrap service missed "
                    f"{self._misses[addr]} heartbeats){': ' + error if error else ''}"
                )
