"""Logging for the whole program: one level (`--log-level`) for the frontend and every rank.

Lines look like SGLang's: `[2025-01-01 12:00:00] message` in the frontend and
`[2025-01-01 12:00:00 DP 0 TP 1] message` in a rank, so interleaved output of several ranks can
be told apart. Rank processes are spawned, so each configures its own root logger here. This
module imports nothing from dpattn: every part may log without import cycles.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(level: str, tag: str = "") -> None:
    """Root logger at `level` with a timestamp (and `tag`) on every line; idempotent."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    fmt = logging.Formatter(f"[%(asctime)s{' ' + tag if tag else ''}] %(message)s", DATE_FORMAT)
    for handler in root.handlers:
        if getattr(handler, "_dpattn", False):
            handler.setFormatter(fmt)
            return
    handler = logging.StreamHandler()
    handler._dpattn = True  # type: ignore[attr-defined]
    handler.setFormatter(fmt)
    root.addHandler(handler)


class RankLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Tags each message `[DP d TP t]`: ranks that share a process (thread backend) too."""

    def __init__(
        self, logger: logging.Logger, dp_rank: int, tp_rank: int, pp_rank: int | None = None
    ) -> None:
        super().__init__(logger, {})
        stage = f"PP {pp_rank} " if pp_rank is not None else ""  # with pipeline stages only
        self.tag = f"[{stage}DP {dp_rank} TP {tp_rank}]"

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"{self.tag} {msg}", kwargs


def rank_logger(name: str, dp_rank: int, tp_rank: int, pp_rank: int | None = None) -> RankLogger:
    return RankLogger(logging.getLogger(name), dp_rank, tp_rank, pp_rank)
