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

ARCHS = ("llama", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHS = ("qwen3_moe", "mixtral")
_CONFIG_CLASSES = dict(llama="LlamaConfig", qwen3="Qwen3Config")
_CONFIG_CLASSES.update(qwen3_moe="Qwen3MoeConfig", mixtral="MixtralConfig")

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


def _rewrite_per_expert(arch: str, out: Path) -> None:
    weight_map: dict[str, str] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        new = _unfuse(arch, tensors)
        save_file(new, str(f), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(new, f.name))
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2) + "\n")


def make_tiny_model(
    arch: str,
    out: str | Path,
    seed: int = 0,
    fused_experts: bool = True,
    dtype: str = "float32",
    **overrides: Any,
) -> Path:
    """Build a tiny random HF checkpoint (config, weights, tokenizer) of ``arch`` in ``out``.

    ``fused_experts=False`` (MoE archs) stores legacy per-expert weight keys instead of
    transformers 5's fused ``experts.gate_up_proj``/``experts.down_proj``.
    """
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out = Path(out)
    tok = make_tokenizer()
    n_tok = len(tok)
    cfg = _base_config(arch, n_tok)
    cfg.update(overrides)
    if cfg["vocab_size"] < n_tok:
        raise ValueError(f"vocab_size={cfg['vocab_size']} < tokenizer vocab size {n_tok}")
    special = {f"{n}_token_id": getattr(tok, f"{n}_token_id") for n in ("bos", "eos", "pad")}
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**cfg, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _rescale_init(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = getattr(torch, dtype)
    model.generation_config = GenerationConfig(**special)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # transformers 5 otherwise reverts fused experts to the legacy layout on save
        kwargs["save_original_format"] = False
    model.save_pretrained(out, **kwargs)
    if not fused_experts and arch in MOE_ARCHS:
        _rewrite_per_expert(arch, out)
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


# flag -> config key (mixtral remaps a couple of them in overrides_from_args)
_FLAGS: dict[str, str] = dict(
    pair.partition("=")[::2]
    for pair in """hidden-size=hidden_size intermediate-size=intermediate_size
    num-layers=num_hidden_layers num-heads=num_attention_heads num-kv-heads=num_key_value_heads
    head-dim=head_dim num-experts=num_experts top-k=num_experts_per_tok
    moe-intermediate-size=moe_intermediate_size vocab-size=vocab_size""".split()
)
_MOE_ONLY = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
# MixtralConfig: experts count is num_local_experts, expert width is intermediate_size
_MIXTRAL_KEYS = {"num_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"}


def add_size_overrides(parser: argparse.ArgumentParser) -> None:
    """Add optional model-size flags (``--hidden-size``, ``--num-experts``, ...) to ``parser``."""
    group = parser.add_argument_group("model size overrides")
    for flag, dest in _FLAGS.items():
        group.add_argument(f"--{flag}", dest=f"size_{dest}", type=int, default=None, metavar="N")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides for the flags that were set, keyed per ``args.arch`` (default qwen3_moe)."""
    arch = getattr(args, "arch", None) or "qwen3_moe"
    result: dict[str, Any] = {}
    for flag, dest in _FLAGS.items():
        value = getattr(args, f"size_{dest}", None)
        if value is None:
            continue
        if dest in _MOE_ONLY and arch not in MOE_ARCHS:
            raise ValueError(f"--{flag} only applies to MoE archs {MOE_ARCHS}")
        result[_MIXTRAL_KEYS.get(dest, dest) if arch == "mixtral" else dest] = value
    return result
