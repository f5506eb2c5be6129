from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpattn.models import tiny, tiny_deepseek
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


# --------------------------------------------------------------------------- DeepSeek V2 / V3

DS_ARCHS = tiny.DEEPSEEK_ARCHS
DS_IDS = torch.randint(0, 400, (1, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ds_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(arch, variant) -> checkpoint; variant: default (per-expert, q-LoRA), fused, no_q_lora."""
    root = tmp_path_factory.mktemp("tiny-deepseek")
    variants: dict[str, dict[str, object]] = {
        "default": {},
        "fused": {"fused_experts": True},
        "no_q_lora": {"q_lora_rank": None},
    }
    return {
        (arch, v): make_tiny_model(arch, root / f"{arch}-{v}", seed=0, **kw)
        for arch in DS_ARCHS
        for v, kw in variants.items()
    }


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _load(path: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _ds_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(DS_IDS).logits


@pytest.mark.parametrize("variant", ["default", "no_q_lora"])
@pytest.mark.parametrize("arch", DS_ARCHS)
def test_deepseek_builds_and_loads(
    ds_models: dict[tuple[str, str], Path], arch: str, variant: str
) -> None:
    path = ds_models[arch, variant]
    cfg = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    expected = dict(
        model_type=arch,
        vocab_size=len(tok),
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1 if arch == "deepseek_v3" else 2,
        kv_lora_rank=32,
        q_lora_rank=48 if variant == "default" else None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attention_bias=False,
        routed_scaling_factor=2.5 if arch == "deepseek_v3" else 1.5,
        norm_topk_prob=arch == "deepseek_v3",
        topk_method="noaux_tc" if arch == "deepseek_v3" else "group_limited_greedy",
        scoring_func="sigmoid" if arch == "deepseek_v3" else "softmax",
    )
    assert {k: cfg.get(k) for k in expected} == expected
    if arch == "deepseek_v3":
        assert cfg["rope_parameters"] == tiny_deepseek.V3_ROPE_PARAMETERS
        assert cfg["rope_interleave"] is True and cfg["num_nextn_predict_layers"] == 0
    else:
        assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}

    keys = set(_keys(path))
    attn = "model.layers.1.self_attn."
    q_lora = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
    assert all((attn + k in keys) == (variant == "default") for k in q_lora)
    assert (attn + "q_proj.weight" in keys) == (variant != "default")
    for k in ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight"]:
        assert attn + k in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # layer 0: dense MLP
    assert not any(k.startswith("model.layers.0.mlp.experts") for k in keys)
    for layer in (1, 2):  # MoE, per-expert keys as on the hub
        mlp = f"model.layers.{layer}.mlp."
        assert mlp + "gate.weight" in keys and mlp + "shared_experts.up_proj.weight" in keys
        assert mlp + "experts.7.down_proj.weight" in keys
        assert (mlp + "gate.e_score_correction_bias" in keys) == (arch == "deepseek_v3")

    model = _load(path)
    assert (model.model.layers[0].self_attn.q_proj is None) == (variant == "default")
    logits = _ds_logits(model)
    assert logits.shape == (1, DS_IDS.shape[1], len(tok))
    assert logits.std().item() > 0.5


def test_deepseek_v3_router_bias(ds_models: dict[tuple[str, str], Path]) -> None:
    path = ds_models["deepseek_v3", "default"]
    tensors = _safetensors(path)
    biases = [tensors[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] for i in (1, 2)]
    for b in biases:
        assert b.dtype == torch.float32 and b.shape == (8,)
        assert (b != 0).all() and b.abs().max() <= tiny_deepseek.E_SCORE_BIAS_RANGE
        assert b.std() > 0.05
    assert not torch.equal(biases[0], biases[1])
    # the router weight got the sharp router init (std 1), not the 0.1 of the other projections
    assert tensors["model.layers.1.mlp.gate.weight"].std() > 0.7

    model = _load(path)
    chosen: list[torch.Tensor] = []
    gate = model.model.layers[1].mlp.gate
    gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].sort(-1).values))
    with_bias = _ds_logits(model)
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    without = _ds_logits(model)
    assert (chosen[0] != chosen[1]).any(-1).float().mean() > 0.2  # it changes the experts chosen
    assert not torch.allclose(with_bias, without)


@pytest.mark.parametrize("arch", DS_ARCHS)
def test_deepseek_per_expert_round_trip(ds_models: dict[tuple[str, str], Path], arch: str) -> None:
    per_expert, fused = ds_models[arch, "default"], ds_models[arch, "fused"]
    fused_t, per_t = _safetensors(fused), _safetensors(per_expert)
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused_t
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in per_t)
    for layer in (1, 2):  # the per-expert tensors are exactly the fused ones, split
        p = f"model.layers.{layer}.mlp.experts."
        gate = torch.stack([per_t[f"{p}{e}.gate_proj.weight"] for e in range(8)])
        up = torch.stack([per_t[f"{p}{e}.up_proj.weight"] for e in range(8)])
        down = torch.stack([per_t[f"{p}{e}.down_proj.weight"] for e in range(8)])
        assert gate.shape == (8, 32, 64) and down.shape == (8, 64, 32)
        assert torch.equal(torch.cat([gate, up], dim=1), fused_t[p + "gate_up_proj"])
        assert torch.equal(down, fused_t[p + "down_proj"])
    rest = {k for k in fused_t if ".mlp.experts." not in k}
    assert rest == {k for k in per_t if ".mlp.experts." not in k}
    assert all(torch.equal(fused_t[k], per_t[k]) for k in rest)

    m_fused, m_per = _load(fused), _load(per_expert)
    sd_fused, sd_per = m_fused.state_dict(), m_per.state_dict()
    assert sd_fused.keys() == sd_per.keys()
    assert all(torch.equal(v, sd_per[k]) for k, v in sd_fused.items())
    # the fused checkpoint is what save_pretrained wrote: loaded back it holds the same tensors
    assert all(torch.equal(sd_fused[k], t) for k, t in fused_t.items())
    torch.testing.assert_close(_ds_logits(m_fused), _ds_logits(m_per), rtol=0, atol=0)


@pytest.mark.parametrize("arch", DS_ARCHS)
def test_deepseek_per_expert_matches_saved_model(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers loads the per-expert (hub-layout) checkpoint back into the model it saved."""
    from transformers import PreTrainedModel

    saved: list[torch.nn.Module] = []
    save = PreTrainedModel.save_pretrained

    def spy(self: PreTrainedModel, *args: object, **kwargs: object) -> object:
        saved.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", spy)
    path = make_tiny_model(arch, tmp_path / arch, seed=5)  # default layout: per-expert
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in _keys(path)
    (original,) = saved
    loaded = _load(path)
    sd_orig, sd_loaded = original.state_dict(), loaded.state_dict()
    assert sd_orig.keys() == sd_loaded.keys()
    assert all(torch.equal(v, sd_loaded[k]) for k, v in sd_orig.items())
    torch.testing.assert_close(_ds_logits(loaded), _ds_logits(original), rtol=0, atol=0)


def test_deepseek_v3_mtp_layers(ds_models: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = make_tiny_model("deepseek_v3", tmp_path / "mtp", seed=0, mtp_layers=1)
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    t = _safetensors(path)
    mtp = "model.layers.3."
    for k in [
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.q_a_proj.weight",
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "embed_tokens.weight",
        "shared_head.head.weight",
        "shared_head.norm.weight",
        "mlp.gate.weight",
        "mlp.gate.e_score_correction_bias",
        "mlp.experts.7.up_proj.weight",
        "mlp.shared_experts.down_proj.weight",
        "input_layernorm.weight",
    ]:
        assert mtp + k in t, k
    assert not any(k.startswith("model.layers.4.") for k in t)
    assert t[mtp + "eh_proj.weight"].shape == (64, 128)
    assert torch.equal(t[mtp + "embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(t[mtp + "shared_head.head.weight"], t["lm_head.weight"])
    # fresh weights, not a copy of layer 2 (a loader that maps layer 3 onto 2 must show)
    q = "self_attn.kv_b_proj.weight"
    assert t[mtp + q].shape == t["model.layers.2." + q].shape
    assert not torch.equal(t[mtp + q], t["model.layers.2." + q])

    base = ds_models["deepseek_v3", "default"]  # same seed, no MTP
    assert {k for k in t if not k.startswith(mtp)} == set(_keys(base))
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])
    torch.testing.assert_close(_ds_logits(model.eval()), _ds_logits(_load(base)), rtol=0, atol=0)

    with pytest.raises(ValueError, match="deepseek_v3"):
        make_tiny_model("deepseek_v2", tmp_path / "v2", mtp_layers=1)


def test_deepseek_bf16_keeps_router_bias_fp32(tmp_path: Path) -> None:
    path = make_tiny_model("deepseek_v3", tmp_path / "bf16", dtype="bfloat16", mtp_layers=1)
    t = _safetensors(path)
    fp32 = sorted(k for k, v in t.items() if v.dtype == torch.float32)
    assert fp32 == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2, 3)]
    assert all(v.dtype == torch.bfloat16 for k, v in t.items() if k not in fp32)
    assert all((t[k] != 0).all() for k in fp32)


def test_deepseek_overrides(tmp_path: Path) -> None:
    argv = ["--num-experts", "16", "--top-k", "4", "--q-lora-rank", "0", "--kv-lora-rank", "16"]
    argv += ["--qk-rope-head-dim", "4", "--num-heads", "2", "--first-k-dense-replace", "2"]
    expected = {
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "num_attention_heads": 2,
        "first_k_dense_replace": 2,
    }
    for arch in DS_ARCHS:
        assert _parse(argv, arch) == expected
    assert _parse(["--no-q-lora"], "deepseek_v2") == {"q_lora_rank": None}
    assert _parse(["--q-lora-rank", "24"], "deepseek_v3") == {"q_lora_rank": 24}
    with pytest.raises(ValueError, match="--head-dim"):
        _parse(["--head-dim", "8"], "deepseek_v3")
    with pytest.raises(ValueError, match="--q-lora-rank"):
        _parse(["--q-lora-rank", "8"], "llama")
    with pytest.raises(ValueError, match="--no-q-lora"):
        _parse(["--no-q-lora"], "qwen3_moe")

    path = make_tiny_model("deepseek_v3", tmp_path / "v3", fused_experts=True, **expected)
    cfg = json.loads((path / "config.json").read_text())
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["num_key_value_heads"] == 2  # follows num_attention_heads (MLA)
    keys = set(_keys(path))
    assert "model.layers.2.mlp.experts.gate_up_proj" in keys
    assert "model.layers.1.mlp.gate_proj.weight" in keys  # 2 dense layers
    assert _logits(path).shape[-1] == cfg["vocab_size"]
    with pytest.raises(ValueError, match="n_group"):
        make_tiny_model("deepseek_v3", tmp_path / "bad", n_routed_experts=4)  # 1 per group
    with pytest.raises(ValueError, match="num_key_value_heads"):
        make_tiny_model("deepseek_v2", tmp_path / "bad", num_key_value_heads=2)
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_model("deepseek_v2", tmp_path / "bad", head_dim=8)


def test_deepseek_cli(tmp_path: Path) -> None:
    from dpattn.cli import main

    out = tmp_path / "cli"
    argv = ["make-tiny-model", "--arch", "deepseek_v3", "--out", str(out), "--seed", "3"]
    assert main([*argv, "--no-q-lora", "--mtp-layers", "1", "--fused-experts"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["q_lora_rank"] is None and cfg["num_nextn_predict_layers"] == 1
    keys = set(_keys(out))
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys
    assert "model.layers.3.mlp.experts.gate_up_proj" in keys
