"""dpattn: LLM inference with data-parallel attention.

The public names are listed in `__all__` and visible to `dir(dpattn)` and to type checkers.
`Engine` and `serve` load on first use: they import torch, transformers and ZMQ, which rank
processes and `dpattn --help` would otherwise pay for on every `import dpattn`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from dpattn.config import EngineConfig, RunnerConfig, SchedulerConfig
from dpattn.executor.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dpattn.entrypoints.engine import Engine
    from dpattn.entrypoints.http_server import serve

try:
    __version__ = version("dpattn")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Engine",
    "EngineConfig",
    "RunnerConfig",
    "SamplingParams",
    "SchedulerConfig",
    "__version__",
    "serve",
]

_LAZY = {"Engine": "dpattn.entrypoints.engine", "serve": "dpattn.entrypoints.http_server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'dpattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
