from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpattn.models import tiny
from dpattn.models.tiny import (
    ARCHS,
    add_size_overrides,
    default_model_dir,
    ensure_default_model,
    make_tiny_model,
    overrides_from_args,
)

PROMPT = "Hello, how are you today?"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, bool], Path] = {}
    for arch in ARCHS:
        for fused in (True, False) if arch in tiny.MOE_ARCHS else (True,):
            built[arch, fused] = make_tiny_model(
                arch, root / f"{arch}-{fused}", seed=0, fused_experts=fused
            )
    return built


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _keys(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward(models: dict[tuple[str, bool], Path], arch: str) -> None:
    path = models[arch, True]
    tok = AutoTokenizer.from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert cfg["vocab_size"] == len(tok)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    logits = _logits(path)
    n = len(tok(PROMPT).input_ids)
    assert logits.shape == (1, n, cfg["vocab_size"])
    assert logits.std().item() > 0.5


@pytest.mark.parametrize("arch", tiny.MOE_ARCHS)
def test_per_expert_checkpoint(models: dict[tuple[str, bool], Path], arch: str) -> None:
    fused, legacy = models[arch, True], models[arch, False]
    fused_keys, legacy_keys = _keys(fused), _keys(legacy)
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused_keys
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in legacy_keys)
    if arch == "mixtral":
        expected = [
            "experts.7.w1.weight",
            "experts.7.w2.weight",
            "experts.7.w3.weight",
            "gate.weight",
        ]
        prefix = "model.layers.1.block_sparse_moe."
    else:
        expected = ["experts.7.gate_proj.weight", "experts.7.up_proj.weight"]
        expected += ["experts.7.down_proj.weight", "gate.weight"]
        prefix = "model.layers.1.mlp."
    for suffix in expected:
        assert prefix + suffix in legacy_keys

    m_fused = AutoModelForCausalLM.from_pretrained(fused)
    m_legacy = AutoModelForCausalLM.from_pretrained(legacy)
    sd_fused, sd_legacy = m_fused.state_dict(), m_legacy.state_dict()
    assert sd_fused.keys() == sd_legacy.keys()
    for k, v in sd_fused.items():
        assert torch.equal(v, sd_legacy[k]), k
    torch.testing.assert_close(_logits(fused), _logits(legacy), rtol=1e-5, atol=1e-5)


def test_tokenizer_round_trip_and_chat_template(models: dict[tuple[str, bool], Path]) -> None:
    tok = AutoTokenizer.from_pretrained(models["llama", True])
    assert 400 <= len(tok) <= 520
    for text in ["héllo wörld — 你好", "The quick brown fox.\n\tTabs & symbols: {}[]<>#@!"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert max(ids) < len(tok)
        assert tok.decode(ids) == text
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    assert all(tok.convert_tokens_to_ids(s) != tok.unk_token_id for s in specials)
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok("<|im_end|>").input_ids

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_tokenizer_training_is_deterministic() -> None:
    assert tiny._train_tokenizer.__wrapped__().to_str() == tiny._train_tokenizer().to_str()


def test_overrides_and_seed(tmp_path: Path) -> None:
    path = make_tiny_model("qwen3", tmp_path / "a", num_hidden_layers=3, vocab_size=600)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == 600
    assert _logits(path).shape[-1] == 600
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model("qwen3", tmp_path / "b", vocab_size=100)
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model("gpt2", tmp_path / "c")

    p1 = make_tiny_model("llama", tmp_path / "s1", seed=1)
    p1b = make_tiny_model("llama", tmp_path / "s1b", seed=1)
    p2 = make_tiny_model("llama", tmp_path / "s2", seed=2)
    assert torch.equal(_logits(p1), _logits(p1b))
    assert not torch.allclose(_logits(p1), _logits(p2))


def test_bf16(tmp_path: Path) -> None:
    path = make_tiny_model("mixtral", tmp_path / "m", dtype="bfloat16", fused_experts=False)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def _parse(argv: list[str], arch: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default=arch)
    add_size_overrides(parser)
    return overrides_from_args(parser.parse_args(argv))


def test_overrides_from_args() -> None:
    assert _parse([], "qwen3_moe") == {}
    argv = [
        "--num-layers",
        "3",
        "--num-experts",
        "4",
        "--top-k",
        "1",
        "--moe-intermediate-size",
        "16",
    ]
    assert _parse(argv, "qwen3_moe") == {
        "num_hidden_layers": 3,
        "num_experts": 4,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": 16,
    }
    assert _parse(argv, "mixtral") == {
        "num_hidden_layers": 3,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "intermediate_size": 16,
    }
    argv = ["--hidden-size", "32", "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "8"]
    argv += ["--intermediate-size", "48", "--vocab-size", "1024"]
    assert _parse(argv, "llama") == {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 48,
        "vocab_size": 1024,
    }
    with pytest.raises(ValueError, match="--num-experts"):
        _parse(["--num-experts", "4"], "llama")


def test_ensure_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPATTN_CACHE", str(tmp_path))
    assert default_model_dir() == tmp_path / "tiny-qwen3-moe"
    first = ensure_default_model()
    assert first == tmp_path / "tiny-qwen3-moe"
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert AutoTokenizer.from_pretrained(first) is not None
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def boom(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(tiny, "make_tiny_model", boom)
    assert ensure_default_model() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen3-moe"]  # no temp leftovers
