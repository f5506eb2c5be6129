"""The DeepSeek V2 / V3 parts of the tiny checkpoints (models/tiny.py): config, its checks,
and fake multi-token-prediction layers laid out as DeepSeek's hub checkpoints have them."""

from __future__ import annotations

from typing import Any

import torch

# YaRN as DeepSeek-V3 uses it, scaled down: 128 original positions x 4 = max_position_embeddings.
V3_ROPE_PARAMETERS: dict[str, Any] = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0)
V3_ROPE_PARAMETERS.update(original_max_position_embeddings=128, beta_fast=32, beta_slow=1)
V3_ROPE_PARAMETERS.update(mscale=1.0, mscale_all_dim=1.0)
E_SCORE_BIAS_RANGE = 0.3  # V3 router correction bias: uniform in [-0.3, 0.3]


def deepseek_config(arch: str, vocab_size: int) -> dict[str, Any]:
    # MLA: 4 heads (attention TP 1, 2, 4), latent KV rank 32, q-LoRA rank 48 (None: plain q_proj).
    # Layer 0 dense, layers 1-2 MoE: 8 routed experts in 4 groups, top-2 of the best 2 groups.
    cfg: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    cfg.update(num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab_size)
    cfg.update(max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6)
    cfg.update(attention_bias=False, kv_lora_rank=32, q_lora_rank=48)
    cfg.update(qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    cfg.update(first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8)
    cfg.update(num_experts_per_tok=2, n_group=4, topk_group=2)
    if arch == "deepseek_v3":
        cfg.update(n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
        cfg.update(rope_interleave=True, rope_parameters=dict(V3_ROPE_PARAMETERS))
        # Not read by transformers' DeepseekV3 (always sigmoid + noaux_tc), kept as the hub has them
        cfg.update(topk_method="noaux_tc", scoring_func="sigmoid")
    else:
        cfg.update(n_shared_experts=2, routed_scaling_factor=1.5, norm_topk_prob=False)
        cfg.update(topk_method="group_limited_greedy", scoring_func="softmax")
        cfg.update(rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    return cfg


def check_deepseek(arch: str, cfg: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Reject configs transformers' DeepSeek classes would mis-build or fail on at runtime."""
    if "head_dim" in overrides:
        raise ValueError(
            f"{arch}: head_dim is derived (config sets it to qk_rope_head_dim); set "
            "qk_nope_head_dim / qk_rope_head_dim / v_head_dim instead"
        )
    heads = cfg["num_attention_heads"]
    if "num_key_value_heads" not in overrides:
        cfg["num_key_value_heads"] = heads
    elif cfg["num_key_value_heads"] != heads:
        raise ValueError(f"{arch}: MLA needs num_key_value_heads == num_attention_heads ({heads})")
    experts, groups, top_groups = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]
    per_group = experts // groups if groups else 0
    # V3 scores a group by the sum of its 2 best experts
    if not groups or experts % groups or per_group < (2 if arch == "deepseek_v3" else 1):
        raise ValueError(
            f"{arch}: n_routed_experts={experts} must split into n_group={groups} equal groups"
            + (" of at least 2 experts" if arch == "deepseek_v3" else "")
        )
    if not 1 <= top_groups <= groups or cfg["num_experts_per_tok"] > top_groups * per_group:
        raise ValueError(
            f"{arch}: need 1 <= topk_group={top_groups} <= n_group={groups} and "
            f"num_experts_per_tok={cfg['num_experts_per_tok']} <= topk_group * {per_group}"
        )


@torch.no_grad()
def append_mtp(
    shards: dict[str, dict[str, torch.Tensor]], num_hidden_layers: int, mtp_layers: int, seed: int
) -> None:
    """Append fake DeepSeek-V3 multi-token-prediction (MTP) layers, laid out as on the hub.

    MTP layer k is ``model.layers.{num_hidden_layers + k}.``: a full decoder layer (fresh random
    weights shaped like the last decoder layer's, in the same expert layout) plus ``enorm``,
    ``hnorm``, ``eh_proj`` ([H, 2H]), ``shared_head.norm`` and copies of the embedding
    (``embed_tokens``) and LM head (``shared_head.head``). Inference without MTP ignores them.
    `shards`: file name -> its tensors, updated in place.
    """
    everything = {k: v for tensors in shards.values() for k, v in tensors.items()}
    src = f"model.layers.{num_hidden_layers - 1}."
    home = next(n for n, tensors in shards.items() if any(k.startswith(src) for k in tensors))
    embed, head = everything["model.embed_tokens.weight"], everything["lm_head.weight"]
    norm = everything["model.norm.weight"]
    hidden = embed.shape[1]
    gen = torch.Generator().manual_seed(seed + 1_000_003)

    def fake(name: str, like: torch.Tensor) -> torch.Tensor:
        if name.endswith("e_score_correction_bias"):
            u = torch.rand(like.shape, generator=gen, dtype=torch.float32)
            return ((2 * u - 1) * E_SCORE_BIAS_RANGE).to(like.dtype)
        noise = torch.randn(like.shape, generator=gen, dtype=torch.float32)
        std = 0.02 if "norm" in name else 1.0 if name.endswith("mlp.gate.weight") else 0.1
        return (float("norm" in name) + std * noise).to(like.dtype)

    for k in range(mtp_layers):
        dst = f"model.layers.{num_hidden_layers + k}."
        layer = {dst + key[len(src) :]: t for key, t in everything.items() if key.startswith(src)}
        extra = {
            "enorm.weight": norm,
            "hnorm.weight": norm,
            "eh_proj.weight": embed.new_empty(hidden, 2 * hidden),
            "shared_head.norm.weight": norm,
        }
        mtp = {name: fake(name, like) for name, like in layer.items()}
        mtp.update({dst + name: fake(dst + name, like) for name, like in extra.items()})
        mtp[dst + "embed_tokens.weight"] = embed.clone()
        mtp[dst + "shared_head.head.weight"] = head.clone()
        shards[home].update(sorted(mtp.items()))
