"""Gemma 3 text (issue 6): tiny random checkpoints (sliding and global layers, an untied and
softcapped variant, a multimodal checkpoint) through the layout verifier.

The real Gemma-3-270M tests are in test_gemma3_real.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dpattn.tools.verify import VerifyConfig, verify

FP32_TOL = 1e-4
TINY_LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 2)]


def make_tiny_gemma3(out: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random Gemma3ForCausalLM: sliding window 4, sliding and global layers mixed."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    from dpattn.models.tiny import make_tokenizer

    tok = make_tokenizer()
    cfg: dict[str, Any] = dict(
        vocab_size=len(tok) + 3,  # not a multiple of attn_tp: exercises vocab padding
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # scaling differs from head_dim ** -0.5
        sliding_window=4,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            # Gemma norms scale by (1 + w): w near 0. Larger weights keep logits far from flat.
            p.copy_((0.1 if "norm" in name else 0.15) * noise)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny")


@pytest.fixture(scope="module")
def tiny_gemma3_variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied LM head and a final logit softcap (larger Gemma configs use both features)."""
    return make_tiny_gemma3(
        tmp_path_factory.mktemp("gemma3v") / "tiny",
        seed=1,
        tie_word_embeddings=False,
        final_logit_softcapping=3.0,
    )


@pytest.fixture(scope="module")
def tiny_gemma3_multimodal(tmp_path_factory: pytest.TempPathFactory, tiny_gemma3: Path) -> Path:
    """Gemma3ForConditionalGeneration (tiny SigLIP tower): dpattn serves its text model."""
    from transformers import (
        AutoConfig,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        SiglipVisionConfig,
    )

    from dpattn.models.tiny import make_tokenizer

    text = AutoConfig.from_pretrained(tiny_gemma3)
    n = text.vocab_size
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=n - 3,
        eoi_token_index=n - 2,
        image_token_index=n - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = Gemma3ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_((0.1 if "norm" in name else 0.15) * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("gemma3mm") / "tiny"
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def _check(cfg: VerifyConfig, report: dict[str, Any], tol: float = FP32_TOL) -> None:
    assert report["ok"], json.dumps(report)[:2000]
    assert report["max_abs_logit_diff"] <= tol, report["max_abs_logit_diff"]
    assert all(tuple(leak) == (0, 0) for leak in report["kv_leaked"])


@pytest.mark.parametrize("tp,dp", TINY_LAYOUTS)
def test_tiny_gemma3_layouts(tiny_gemma3: Path, tp: int, dp: int) -> None:
    cfg = VerifyConfig(str(tiny_gemma3), tp, dp, backend="thread", decode_steps=6)
    _check(cfg, verify(cfg))


def test_tiny_gemma3_prompts_cross_the_sliding_window(tiny_gemma3: Path) -> None:
    # Prompts of up to 16 tokens plus decode steps run far past the window of 4, so sliding
    # layers must mask like HF (a wrong window edge shows up as a large logit diff).
    cfg = VerifyConfig(str(tiny_gemma3), 2, 2, backend="thread", num_prompts=7, seed=3)
    report = verify(cfg)
    _check(cfg, report)
    assert max(r["prompt_len"] for r in report["requests"].values()) > 4


@pytest.mark.parametrize(
    "tp,dp,kw",
    [(2, 1, {}), (4, 2, {"moe_dense_tp_size": 1}), (2, 2, {"dp_padding_mode": "max_len"})],
)
def test_tiny_gemma3_variant(tiny_gemma3_variant: Path, tp: int, dp: int, kw: Any) -> None:
    cfg = VerifyConfig(str(tiny_gemma3_variant), tp, dp, backend="thread", **kw)
    _check(cfg, verify(cfg))


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1)])
def test_tiny_gemma3_multimodal_checkpoint(tiny_gemma3_multimodal: Path, tp: int, dp: int) -> None:
    # The reference is transformers' Gemma3ForConditionalGeneration on text-only input.
    cfg = VerifyConfig(str(tiny_gemma3_multimodal), tp, dp, backend="thread")
    _check(cfg, verify(cfg))


def test_tiny_gemma3_bf16(tiny_gemma3: Path) -> None:
    cfg = VerifyConfig(str(tiny_gemma3), 2, 2, backend="thread", dtype="bfloat16")
    _check(cfg, verify(cfg), tol=0.25)


def test_wrong_reference_fails(tiny_gemma3: Path, tiny_gemma3_variant: Path) -> None:
    cfg = VerifyConfig(
        str(tiny_gemma3), 1, 1, backend="thread", reference_model_path=str(tiny_gemma3_variant)
    )
    assert not verify(cfg)["ok"]
