"""Tiny DeepSeek V2 / V3 checkpoints (models/tiny.py, models/tiny_deepseek.py): they build and
load in transformers, with and without q-LoRA, per-expert keys, the V3 router bias, MTP layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_tiny import _keys, _logits, _parse  # the shared helpers of the GQA archs' tests
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpattn.models import tiny, tiny_deepseek
from dpattn.models.tiny import make_tiny_model

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
