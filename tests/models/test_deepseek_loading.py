"""Loading DeepSeek checkpoints: what is skipped (multi-token-prediction layers) and what is
refused (a quantized checkpoint). Their lazy reads are checked with the others in
test_loader.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loader import build
from transformers import AutoConfig

import dpattn.models.loader as loader
from dpattn.distributed.parallel_state import Layout, thread_parallel_state
from dpattn.distributed.thread_backend import ThreadWorld
from dpattn.models.llama import ModelOptions
from dpattn.models.registry import build_model
from dpattn.models.tiny import make_tiny_model


def test_mtp_layers_are_skipped_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_tiny_model("deepseek_v3", tmp_path / "mtp", mtp_layers=1)
    model = build(path, (1, 1, False, None), 0, torch.float32)
    with caplog.at_level("INFO", logger="dpattn.models.deepseek"):
        loader.load_weights(model, path)
    # the decoder layers read exactly as without the MTP layer (same seed)
    plain = build(
        make_tiny_model("deepseek_v3", tmp_path / "plain"), (1, 1, False, None), 0, torch.float32
    )
    loader.load_weights(plain, tmp_path / "plain")
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name
    assert [r.message for r in caplog.records if "multi-token" in r.message] == [
        "skipping the checkpoint's multi-token-prediction layers (1)"
    ]


def test_quantized_checkpoint_is_refused(mla_models: dict[str, Path]) -> None:
    """A quantization dpattn cannot read (only FP8 block-wise and GGUF) is refused, named."""
    cfg = AutoConfig.from_pretrained(mla_models["deepseek_v3"])
    cfg.quantization_config = {"quant_method": "gptq", "bits": 4}
    ps = thread_parallel_state(ThreadWorld(1), Layout(1, 1), 0)
    with pytest.raises(ValueError, match="quantization_config"):
        build_model(cfg, ps, ModelOptions())
