"""`dpattn serve` exits when its engine dies, so that a supervisor (systemd, Kubernetes)
restarts it: SGLang's and vLLM's behaviour. The Engine's own watchdog notices a dead rank within
a second and stops the others; this stops the HTTP server behind it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from dpattn.entrypoints.engine import Engine

log = logging.getLogger(__name__)


class ExitOnEngineDeath:
    """Tells `server` (a uvicorn.Server) to exit once `engine.failure` is set; `reason` is it."""

    def __init__(self, engine: Engine, server: Any, poll_s: float = 0.2) -> None:
        self.engine, self.server, self.poll_s = engine, server, poll_s
        self.reason: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            if self.engine.failure:
                self.reason = self.engine.failure
                log.error(
                    "%s; the server exits (--keep-alive-on-engine-death keeps it up)", self.reason
                )
                self.server.should_exit = True
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
