"""Architecture registry: which model class serves a Hugging Face config."""

from __future__ import annotations

from typing import Any

from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.models.deepseek import DeepseekModel, is_deepseek
from dpattn.models.gemma3 import Gemma3Model, gemma3_text_config, is_gemma3
from dpattn.models.llama import DecoderModel, ModelOptions


def text_config(cfg: Any) -> Any:
    """The config the model is built from (Gemma3ForConditionalGeneration: its text_config)."""
    return gemma3_text_config(cfg) if is_gemma3(cfg) else cfg


def build_model(cfg: Any, ps: ParallelState, opts: ModelOptions) -> nn.Module:
    """Gemma 3 (CausalLM or the text half of ConditionalGeneration), DeepSeek V2 / V3, else the
    Llama family."""
    quant = getattr(cfg, "quantization_config", None)
    if quant:
        # Reading quantized weights as plain ones (an FP8 checkpoint without its block scales)
        # would serve garbage: refuse instead.
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"unsupported checkpoint: quantization_config (quant_method={method!r})")
    if is_gemma3(cfg):
        return Gemma3Model(cfg, ps, opts)
    if is_deepseek(cfg):
        return DeepseekModel(cfg, ps, opts)
    return DecoderModel(cfg, ps, opts)
