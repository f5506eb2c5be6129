"""Tiny random Hugging Face-format checkpoints (model + tokenizer) for tests and demos."""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dpattn.models.tiny_deepseek import (
    E_SCORE_BIAS_RANGE,
    append_mtp,
    check_deepseek,
    deepseek_config,
)

# ARCHS / MOE_ARCHS: the GQA archs of the shared test matrices (tests/conftest.py,
# tests/tools/test_verify.py); the MLA archs have their own (mla_models, test_verify_mla.py).
ARCHS = ("llama", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHS = ("qwen3_moe", "mixtral")
DEEPSEEK_ARCHS = ("deepseek_v2", "deepseek_v3")
TINY_ARCHS = ARCHS + DEEPSEEK_ARCHS
ALL_MOE_ARCHS = MOE_ARCHS + DEEPSEEK_ARCHS
_CONFIG_CLASSES = dict(llama="LlamaConfig", qwen3="Qwen3Config")
_CONFIG_CLASSES.update(qwen3_moe="Qwen3MoeConfig", mixtral="MixtralConfig")
_CONFIG_CLASSES.update(deepseek_v2="DeepseekV2Config", deepseek_v3="DeepseekV3Config")
# Per-arch default of make_tiny_model(fused_experts=None): DeepSeek's hub checkpoints store
# per-expert keys, so the tiny ones do too.
_FUSED_BY_DEFAULT = dict.fromkeys(ARCHS, True) | dict.fromkeys(DEEPSEEK_ARCHS, False)

BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
TOKENIZER_VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still be useful when we want to test
the plumbing of an inference engine: the scheduler, the cache, the kernels and the way tokens flow
from one process to another. Nobody expects it to write poetry.

Once upon a time there was a little village by the sea. Every morning the fishermen went out in
their boats, and every evening they came back with baskets full of silver fish. The children played
on the sand, the old people sat in the shade, and the cats waited patiently near the harbour for
their share of the catch.

Attention is a function of queries, keys and values. Each token looks at the tokens before it,
computes a weighted sum of their values, and passes the result to the next layer. In a mixture of
experts, a router picks two of eight experts for every token, and the outputs of those experts are
combined with the router weights.

What time is it? It is half past seven in the evening, and the weather is mild. Would you like a
cup of tea, some bread and cheese, or perhaps a bowl of soup? Thank you, that would be lovely.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear too.

User: Hello! Can you help me with a question about the history of the city?
Assistant: Of course. The city was founded on the river more than a thousand years ago,
and it grew because merchants could trade there in spring, summer, autumn and winter.
"""


@functools.lru_cache(maxsize=1)
def _train_tokenizer() -> Tokenizer:
    """Train a deterministic byte-level BPE on the embedded corpus (cached in-process)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok


def make_tokenizer() -> Any:
    """Return a fresh ``PreTrainedTokenizerFast`` wrapping the cached trained tokenizer."""
    from transformers import PreTrainedTokenizerFast

    obj = Tokenizer.from_str(_train_tokenizer().to_str())
    tok = PreTrainedTokenizerFast(tokenizer_object=obj, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _base_config(arch: str, vocab_size: int) -> dict[str, Any]:
    if arch in DEEPSEEK_ARCHS:
        return deepseek_config(arch, vocab_size)
    cfg: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    cfg.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size)
    cfg.update(max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch == "qwen3_moe":
        cfg.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
        cfg.update(norm_topk_prob=True)
    elif arch == "mixtral":
        cfg.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64)
    return cfg


@torch.no_grad()
def _rescale_init(model: torch.nn.Module, seed: int) -> None:
    """Re-init with larger weights so logits are far from flat (greedy argmax not tie-prone)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        # A sharp router keeps top-k choices away from near-ties that bf16 rounding would flip.
        router = name.endswith("mlp.gate.weight")
        std = 0.02 if "norm" in name else 1.0 if router else 0.2 if "lm_head" in name else 0.1
        p.copy_(float("norm" in name) + std * noise)  # norm weights: 1 + small noise
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            # DeepSeek-V3's router adds it to the sigmoid scores to choose experts (not to weight
            # them): non-zero, so that it changes which experts are chosen.
            u = torch.rand(b.shape, generator=gen, dtype=torch.float32)
            b.copy_((2 * u - 1) * E_SCORE_BIAS_RANGE)


_FUSED_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _unfuse(arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused ``experts.gate_up_proj``/``down_proj`` -> legacy per-expert keys."""
    mixtral = arch == "mixtral"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _FUSED_RE.match(key)
        if m is None:
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral else key] = t
            continue
        prefix = f"{m.group(1)}.{'block_sparse_moe' if mixtral else 'mlp'}.experts"
        for e in range(t.shape[0]):
            if m.group(2) == "gate_up_proj":  # [E, 2I, H]: first I rows gate, next I up
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.{names[0]}.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.{names[1]}.weight"] = up.contiguous()
            else:  # [E, H, I]
                out[f"{prefix}.{e}.{names[2]}.weight"] = t[e].contiguous()
    return out


def _read_shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> its tensors, for every ``*.safetensors`` in ``out``."""
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            shards[f.name] = {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118
    return shards


def _write_shards(out: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    """Rewrite the shards (and the index's weight map, when sharded)."""
    weight_map: dict[str, str] = {}
    for name, tensors in shards.items():
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")


def _rewrite_per_expert(arch: str, out: Path) -> None:
    shards = _read_shards(out)
    _write_shards(out, {name: _unfuse(arch, tensors) for name, tensors in shards.items()})


def make_tiny_model(
    arch: str,
    out: str | Path,
    seed: int = 0,
    fused_experts: bool | None = None,
    dtype: str = "float32",
    mtp_layers: int = 0,
    **overrides: Any,
) -> Path:
    """Build a tiny random HF checkpoint (config, weights, tokenizer) of ``arch`` in ``out``.

    ``fused_experts=False`` (MoE archs) stores legacy per-expert weight keys
    (``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``; mixtral:
    ``block_sparse_moe.experts.{e}.w1/w2/w3``) instead of transformers 5's fused
    ``experts.gate_up_proj``/``experts.down_proj``.
    ``None`` is the arch's hub layout: per-expert for ``deepseek_v2``/``deepseek_v3``, else fused.

    ``mtp_layers`` (``deepseek_v3`` only; alias override ``num_nextn_predict_layers``) appends
    that many fake multi-token-prediction layers as ``model.layers.{num_hidden_layers + k}.*`` and
    records ``num_nextn_predict_layers`` in config.json. ``q_lora_rank=0`` or ``None`` (DeepSeek)
    gives a plain ``q_proj``. DeepSeek-V3's router bias ``e_score_correction_bias`` is random
    (uniform in +-0.3) and stays float32 whatever ``dtype`` is, as in the hub checkpoints.
    """
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {TINY_ARCHS}")
    out = Path(out)
    tok = make_tokenizer()
    n_tok = len(tok)
    cfg = _base_config(arch, n_tok)
    overrides = dict(overrides)
    mtp_layers = int(overrides.pop("num_nextn_predict_layers", mtp_layers) or 0)
    cfg.update(overrides)
    if cfg["vocab_size"] < n_tok:
        raise ValueError(f"vocab_size={cfg['vocab_size']} < tokenizer vocab size {n_tok}")
    if mtp_layers and arch != "deepseek_v3":
        raise ValueError(
            f"mtp_layers (num_nextn_predict_layers) only applies to deepseek_v3, not {arch}"
        )
    if arch in DEEPSEEK_ARCHS:
        if not cfg.get("q_lora_rank"):
            cfg["q_lora_rank"] = None  # 0 / None: plain q_proj, as in DeepSeek-V2-Lite
        check_deepseek(arch, cfg, overrides)
    if arch == "deepseek_v3":
        cfg["num_nextn_predict_layers"] = mtp_layers  # the config class defaults to 1
    if fused_experts is None:
        fused_experts = _FUSED_BY_DEFAULT[arch]
    special = {f"{n}_token_id": getattr(tok, f"{n}_token_id") for n in ("bos", "eos", "pad")}
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**cfg, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _rescale_init(model, seed)
    fp32_buffers = {
        name: b.detach().clone()
        for name, b in model.named_buffers()
        if name.endswith("e_score_correction_bias")
    }
    model = model.to(getattr(torch, dtype)).eval()
    for name, b in fp32_buffers.items():  # .to() casts buffers too; the hub keeps these in fp32
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, b)
    model.config.dtype = getattr(torch, dtype)
    model.generation_config = GenerationConfig(**special)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # transformers 5 otherwise reverts fused experts to the legacy layout on save
        kwargs["save_original_format"] = False
    model.save_pretrained(out, **kwargs)
    if not fused_experts and arch in ALL_MOE_ARCHS:
        _rewrite_per_expert(arch, out)
    if mtp_layers:
        shards = _read_shards(out)
        append_mtp(shards, cfg["num_hidden_layers"], mtp_layers, seed)
        _write_shards(out, shards)
    tok.save_pretrained(out)
    return out


def default_model_dir() -> Path:
    return Path(os.environ.get("DPATTN_CACHE", "~/.cache/dpattn")).expanduser() / "tiny-qwen3-moe"


def ensure_default_model() -> Path:
    """Build the default tiny qwen3_moe model once (atomically) and return its directory."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        make_tiny_model("qwen3_moe", tmp, seed=0)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# flag -> config key (mixtral and deepseek remap some of them in overrides_from_args)
_FLAGS: dict[str, str] = dict(
    pair.partition("=")[::2]
    for pair in """hidden-size=hidden_size intermediate-size=intermediate_size
    num-layers=num_hidden_layers num-heads=num_attention_heads num-kv-heads=num_key_value_heads
    head-dim=head_dim num-experts=num_experts top-k=num_experts_per_tok
    moe-intermediate-size=moe_intermediate_size vocab-size=vocab_size
    q-lora-rank=q_lora_rank kv-lora-rank=kv_lora_rank qk-nope-head-dim=qk_nope_head_dim
    qk-rope-head-dim=qk_rope_head_dim v-head-dim=v_head_dim
    first-k-dense-replace=first_k_dense_replace""".split()
)
_MOE_ONLY = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
_DEEPSEEK_ONLY = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")
_DEEPSEEK_ONLY += ("v_head_dim", "first_k_dense_replace")
# MixtralConfig: experts count is num_local_experts, expert width is intermediate_size
_MIXTRAL_KEYS = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"}
_DEEPSEEK_KEYS = {"num_experts": "n_routed_experts"}


def add_size_overrides(parser: argparse.ArgumentParser) -> None:
    """Add optional model-size flags (``--hidden-size``, ``--num-experts``, ...) to ``parser``."""
    group = parser.add_argument_group("model size overrides")
    for flag, dest in _FLAGS.items():
        group.add_argument(f"--{flag}", dest=f"size_{dest}", type=int, default=None, metavar="N")
    group.add_argument(
        "--no-q-lora",
        dest="size_no_q_lora",
        action="store_true",
        help="deepseek: q_lora_rank=None, a plain q_proj (same as --q-lora-rank 0)",
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides for the flags that were set, keyed per ``args.arch`` (default qwen3_moe)."""
    arch = getattr(args, "arch", None) or "qwen3_moe"
    deepseek = arch in DEEPSEEK_ARCHS
    result: dict[str, Any] = {}
    for flag, dest in _FLAGS.items():
        value = getattr(args, f"size_{dest}", None)
        if value is None:
            continue
        if dest in _MOE_ONLY and arch not in ALL_MOE_ARCHS:
            raise ValueError(f"--{flag} only applies to MoE archs {ALL_MOE_ARCHS}")
        if dest in _DEEPSEEK_ONLY and not deepseek:
            raise ValueError(f"--{flag} only applies to {DEEPSEEK_ARCHS}")
        if dest == "head_dim" and deepseek:
            raise ValueError("--head-dim does not apply to deepseek: use --qk-nope-head-dim etc.")
        keys = _MIXTRAL_KEYS if arch == "mixtral" else _DEEPSEEK_KEYS if deepseek else {}
        result[keys.get(dest, dest)] = value
    if getattr(args, "size_no_q_lora", False):
        if not deepseek:
            raise ValueError(f"--no-q-lora only applies to {DEEPSEEK_ARCHS}")
        if result.get("q_lora_rank"):
            raise ValueError("--no-q-lora contradicts --q-lora-rank N (N > 0)")
        result["q_lora_rank"] = None
    elif deepseek and result.get("q_lora_rank", 1) == 0:
        result["q_lora_rank"] = None
    return result
