"""dpattn: LLM inference with data-parallel attention."""

from __future__ import annotations

from typing import Any

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    # Lazy: `import dpattn` stays cheap for rank processes and the CLI.
    if name == "Engine":
        from dpattn.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)
