"""Architecture registry: which model class serves a Hugging Face config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.models.deepseek import DeepseekModel, is_deepseek
from dpattn.models.fp8 import fp8_block_size
from dpattn.models.gemma3 import Gemma3Model, gemma3_text_config, is_gemma3
from dpattn.models.llama import DecoderModel, ModelOptions
from dpattn.models.stage import StageLayers, partition_layers


def text_config(cfg: Any) -> Any:
    """The config the model is built from (Gemma3ForConditionalGeneration: its text_config)."""
    return gemma3_text_config(cfg) if is_gemma3(cfg) else cfg


def model_stages(
    model_path: str, pp_size: int, partition: Sequence[int] | None = None
) -> list[StageLayers]:
    """The pipeline stages of a checkpoint's decoder layers, from its config alone: checked
    before any rank starts (StagePartitionError, one line, names the flag)."""
    from transformers import AutoConfig  # here: building a model needs none of it

    layers = int(text_config(AutoConfig.from_pretrained(model_path)).num_hidden_layers)
    return partition_layers(layers, pp_size, partition)


def build_model(
    cfg: Any, ps: ParallelState, opts: ModelOptions, stage: StageLayers | None = None
) -> nn.Module:
    """Gemma 3 (CausalLM or the text half of ConditionalGeneration), DeepSeek V2 / V3, else the
    Llama family; `stage`: only a pipeline stage's layers and ends (models/stage.py; default:
    the whole model)."""
    # Anything but FP8 block-wise weights (read dequantized, models/fp8.py) is refused with the
    # field named: quantized weights read as plain ones would serve garbage.
    fp8_block_size(getattr(cfg, "quantization_config", None))
    if is_gemma3(cfg):
        return Gemma3Model(cfg, ps, opts, stage)
    if is_deepseek(cfg):
        return DeepseekModel(cfg, ps, opts, stage)
    return DecoderModel(cfg, ps, opts, stage)
