"""Per-rank weight loading (get_slice): parameters equal the old full-read path's (kept below as
the reference), and a tp=2 rank reads about half of what a tp=1 rank reads."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import dpattn.models.loader as loader
from dpattn.distributed.parallel_state import Layout, thread_parallel_state
from dpattn.distributed.thread_backend import ThreadWorld
from dpattn.layers.embedding import VocabParallelEmbedding
from dpattn.layers.weights import LazyTensor, cat, shard, stack
from dpattn.models.llama import ModelOptions
from dpattn.models.registry import build_model, text_config

# (tp, dp, ep, moe_dense_tp_size)
LAYOUTS = [
    (1, 1, False, None),
    (2, 1, False, None),
    (2, 2, False, None),
    (2, 1, True, None),
    (2, 2, True, None),
    (4, 1, False, None),  # 2 KV heads over attn_tp 4: KV heads replicated
    (4, 2, True, None),
]


# ---- the old full-read path (reference) ----


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                tensors[key] = fh.get_tensor(key)
    return tensors


_PER_EXPERT = re.compile(
    r"(layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_EXPERT_KIND = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_RENAMES = [
    (re.compile(r"self_attn\.([qkvo])_proj\.weight$"), r"self_attn.\1_proj"),
    (re.compile(r"self_attn\.([qkv])_proj\.bias$"), r"self_attn.\1_bias"),
    (re.compile(r"mlp\.experts\.gate_up_proj(\.weight)?$"), "mlp.w13"),
    (re.compile(r"mlp\.experts\.down_proj(\.weight)?$"), "mlp.w2"),
    (re.compile(r"mlp\.gate\.weight$"), "mlp.gate"),
    (re.compile(r"mlp\.down_proj\.weight$"), "mlp.down_proj"),
    # DeepSeek: MLA projections, the V3 router's correction bias, shared experts
    (
        re.compile(r"self_attn\.(q_[ab]_proj|kv_a_proj_with_mqa|kv_b_proj)\.weight$"),
        r"self_attn.\1",
    ),
    (re.compile(r"mlp\.gate\.e_score_correction_bias$"), "mlp.e_score_correction_bias"),
    (re.compile(r"shared_experts\.down_proj\.weight$"), "shared_experts.down_proj"),
]


def reference_params(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    dense: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        name = model.checkpoint_name(key)
        if name is None:
            continue
        m = _PER_EXPERT.search(name)
        if m:
            experts[(m[1], _EXPERT_KIND.get(m[3], m[3]))][int(m[2])] = t
            continue
        m2 = re.search(r"(layers\.\d+\.mlp(\.shared_experts)?)\.(gate_proj|up_proj)\.weight$", name)
        if m2:
            dense[(m2[1], m2[3])] = t
            continue
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
        out[name] = t
    for (prefix, kind), t in dense.items():
        if kind == "gate_proj":
            out[f"{prefix}.gate_up_proj"] = torch.cat([t, dense[(prefix, "up_proj")]])
    for prefix in {p for p, _ in experts}:
        n = len(experts[(prefix, "gate_proj")])
        gate, up, down = (experts[(prefix, k)] for k in ("gate_proj", "up_proj", "down_proj"))
        out[f"{prefix}.w13"] = torch.stack([torch.cat([gate[e], up[e]]) for e in range(n)])
        out[f"{prefix}.w2"] = torch.stack([down[e] for e in range(n)])
    return out


def reference_load(model: Any, path: Path) -> None:
    full = reference_params(model, read_safetensors(path))
    for name, p in model.named_parameters():
        t = full[name].to(p.dtype)
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, VocabParallelEmbedding):  # the old padding loader
            local = t.new_zeros((module.shard_size, t.shape[1]))
            rows = t[module.lo : module.lo + module.shard_size]
            local[: rows.shape[0]] = rows
        else:
            local = p.weight_loader(t)
        assert local.shape == p.shape
        p.data.copy_(local)


# ---- helpers ----


def build(path: Path, layout: tuple[Any, ...], rank: int, dtype: torch.dtype) -> Any:
    tp, dp, ep, dense_tp = layout
    ps = thread_parallel_state(ThreadWorld(tp), Layout(tp, dp), rank)
    cfg = text_config(AutoConfig.from_pretrained(path))
    return build_model(cfg, ps, ModelOptions(dtype, ep, dense_tp))


def make_tiny_gemma3(out: Path, tie: bool) -> Path:
    """Gemma 3 with a vocab that is not a multiple of attn_tp (padded embedding rows)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from dpattn.models.tiny import make_tokenizer

    tok = make_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok) + 3,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=tie,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(
    tiny_models: dict[str, Path],
    per_expert_models: dict[str, Path],
    mixed_moe_model: Path,
    mla_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader-gemma3")
    return {
        **tiny_models,
        **mla_models,
        **{f"{arch}_per_expert": p for arch, p in per_expert_models.items()},
        "qwen3_moe_mixed": mixed_moe_model,
        "gemma3": make_tiny_gemma3(root / "tied", tie=True),
        "gemma3_untied": make_tiny_gemma3(root / "untied", tie=False),
    }


MODEL_NAMES = """llama qwen3 qwen3_moe mixtral qwen3_moe_per_expert mixtral_per_expert qwen3_moe_mixed
gemma3 gemma3_untied deepseek_v2 deepseek_v3 deepseek_v3_noq""".split()


# ---- equality with the full-read path ----


def assert_equal_full_read(path: Path, layout: tuple[Any, ...], dtype: torch.dtype) -> None:
    """Every rank's parameters, loaded lazily, equal the full-read reference's exactly."""
    for rank in range(layout[0]):
        lazy = build(path, layout, rank, dtype)
        loader.load_weights(lazy, path)
        ref = build(path, layout, rank, dtype)
        reference_load(ref, path)
        ref_params = dict(ref.named_parameters())
        for pname, p in lazy.named_parameters():
            assert p.dtype == dtype
            assert torch.equal(p, ref_params[pname]), f"{path.name} rank {rank}: {pname} differs"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "tp{}-dp{}-ep{:d}".format(*x))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rank_params_equal_full_read(models: dict[str, Path], name: str, layout: tuple) -> None:
    assert_equal_full_read(models[name], layout, torch.float32)


@pytest.mark.parametrize("name", ["qwen3_moe", "gemma3_untied"])
def test_bf16_equal_full_read(models: dict[str, Path], name: str) -> None:
    """The dtype conversion after reading the slice matches converting the full tensor."""
    assert_equal_full_read(models[name], (2, 1, False, None), torch.bfloat16)


@pytest.mark.parametrize("tp", [1, 2])
def test_dense_scattered_layout_equal_full_read(models: dict[str, Path], tp: int) -> None:
    # moe_dense_tp_size=1: the dense layer whole on every rank
    assert_equal_full_read(models["qwen3_moe_mixed"], (tp, 1, False, 1), torch.float32)


# ---- only slices are read ----


class _CountingSlice:
    def __init__(self, sl: Any, key: str, reads: dict[str, int]) -> None:
        self.sl, self.key, self.reads = sl, key, reads

    def get_shape(self) -> Any:
        return self.sl.get_shape()

    def get_dtype(self) -> Any:
        return self.sl.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        t = self.sl[index]
        self.reads[self.key] += t.numel() * t.element_size()
        return t


class _CountingOpen:
    """safe_open that counts the bytes each get_slice read returns, and full reads."""

    reads: dict[str, int] = defaultdict(int)
    full_reads: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fh = safe_open(*args, **kwargs)

    def __enter__(self) -> _CountingOpen:
        self.fh.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.fh.__exit__(*exc)

    def keys(self) -> Any:
        return self.fh.keys()

    def metadata(self) -> Any:
        return self.fh.metadata()

    def get_slice(self, key: str) -> _CountingSlice:
        return _CountingSlice(self.fh.get_slice(key), key, type(self).reads)

    def get_tensor(self, key: str) -> torch.Tensor:
        type(self).full_reads.append(key)
        return self.fh.get_tensor(key)


def bytes_read(
    monkeypatch: pytest.MonkeyPatch, path: Path, layout: tuple[Any, ...], rank: int
) -> dict[str, int]:
    _CountingOpen.reads = defaultdict(int)
    _CountingOpen.full_reads = []
    monkeypatch.setattr(loader, "safe_open", _CountingOpen)
    model = build(path, layout, rank, torch.float32)
    loader.load_weights(model, path)
    assert _CountingOpen.full_reads == [], "get_tensor (a full read) was called"
    return dict(_CountingOpen.reads)


def checkpoint_sizes(path: Path) -> dict[str, int]:
    sizes = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                t = fh.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                sizes[key] = n * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return sizes


MLP = re.compile(r"(mlp|block_sparse_moe)\.(?!gate\.weight$)")
ATTN_TP = re.compile(r"self_attn\.[qkvo]_proj|embed_tokens|lm_head")  # sharded over attn_tp
REPLICATED = re.compile(r"(norm\.weight|(mlp|block_sparse_moe)\.gate\.weight)$")


@pytest.mark.parametrize(
    "name,layout",
    [
        ("llama", (2, 1, False, None)),
        ("qwen3_moe", (2, 1, False, None)),
        ("qwen3_moe", (2, 1, True, None)),
        ("qwen3_moe", (2, 2, False, None)),  # attn_tp 1: attention whole on both ranks
        ("mixtral_per_expert", (2, 1, False, None)),
        ("mixtral_per_expert", (2, 2, True, None)),
        ("gemma3_untied", (2, 1, False, None)),
    ],
)
def test_tp2_rank_reads_only_its_slices(
    monkeypatch: pytest.MonkeyPatch, models: dict[str, Path], name: str, layout: tuple
) -> None:
    path = models[name]
    tp, dp = layout[:2]
    sizes = checkpoint_sizes(path)
    full = bytes_read(monkeypatch, path, (1, 1, False, None), 0)
    # tp=1 reads every weight it loads exactly once, in full (lm_head only when untied)
    assert full == {k: n for k, n in sizes.items() if not k.startswith("lm_head.") or k in full}
    ranks = [bytes_read(monkeypatch, path, layout, r) for r in range(tp)]
    sharded = 0
    for key, n in full.items():
        per_rank = [r.get(key, 0) for r in ranks]
        if REPLICATED.search(key) or (ATTN_TP.search(key) and dp == tp):
            assert per_rank == [n] * tp, (key, per_rank, n)
            continue
        assert MLP.search(key) or ATTN_TP.search(key), f"unexpected checkpoint key {key}"
        if layout[2] and re.search(r"experts\.\d+\.", key):  # EP: a per-expert key is whole
            assert sorted(per_rank) == [0] * (tp - 1) + [n], (key, per_rank, n)
        else:  # half each (an odd vocab: one row more on the first rank)
            assert max(per_rank) <= 1.01 * n / tp, (key, per_rank, n)
        assert sum(per_rank) == n, (key, per_rank, n)  # every byte read once, by one rank
        sharded += n
    for r in ranks:
        if dp == 1:  # everything but norms and routers is sharded
            assert sum(r.values()) <= 0.65 * sum(full.values())
        assert sum(n for k, n in r.items() if MLP.search(k)) <= 0.5 * sum(
            n for k, n in full.items() if MLP.search(k)
        )
    assert sharded > 0.5 * sum(full.values()) or dp > 1


# ---- the lazy tensor itself ----


def _pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, LazyTensor]:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return t, LazyTensor.from_tensor(t)


def test_lazy_ops_match_torch() -> None:
    a, la = _pair((6, 4, 5), 0)
    b, lb = _pair((6, 4, 5), 1)
    c, lc = _pair((6, 3, 5), 2)
    cases = [
        (a.narrow(1, 1, 2), la.narrow(1, 1, 2)),
        (a.narrow(-1, -3, 2), la.narrow(-1, -3, 2)),
        (a[2:5, :, 1:], la[2:5, :, 1:]),
        (a[..., :2], la[..., :2]),
        (torch.cat([a, c], 1).narrow(1, 3, 4), torch.cat([la, lc], 1).narrow(1, 3, 4)),
        (torch.cat([a, c], dim=1).narrow(0, 1, 2), torch.cat([la, c], dim=1).narrow(0, 1, 2)),
        (torch.stack([a, b], 1).narrow(1, 1, 1), torch.stack([la, lb], 1).narrow(1, 1, 1)),
        (torch.stack([a, b]).narrow(2, 1, 3), torch.stack([la, lb]).narrow(2, 1, 3)),
        (a.new_zeros((2, 4, 5)), la.new_zeros((2, 4, 5))),
        (torch.cat([a, a.new_zeros((2, 4, 5))])[5:], torch.cat([la, la.new_zeros((2, 4, 5))])[5:]),
        (shard(torch.cat([a, b], 2), 2, 1, 2), shard(cat([la, lb], 2), 2, 1, 2)),
        (stack([a, b], -1)[..., 1:], stack([la, lb], -1)[..., 1:]),
        (a.narrow(0, 6, 0), la.narrow(0, 6, 0)),
    ]
    for n in (1, 2, 3, 4, 7):
        cases += list(zip(a.chunk(n, 0), la.chunk(n, 0), strict=True))
        cases += list(zip(torch.cat([a, c], 1).chunk(n, 1), cat([la, c], 1).chunk(n, 1)))
    for want, got in cases:
        assert isinstance(got, LazyTensor)
        assert tuple(got.shape) == tuple(want.shape)
        assert torch.equal(got.materialize(), want)
        out = torch.full(want.shape, float("nan"), dtype=torch.float64)
        got.read_into(out)
        assert torch.equal(out, want.double())
    # other torch functions materialise the lazy arguments
    assert torch.equal(torch.add(la[1:3], 1), a[1:3] + 1)


def test_gate_up_loader_on_lazy_stack_reads_only_the_shard() -> None:
    """MoE w13 from per-expert keys: expert, gate/up and intermediate cuts push into the parts."""
    from dpattn.layers.mlp import gate_up_loader

    reads: list[tuple[slice, ...]] = []

    class Source:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype

        def read(self, index: tuple[slice, ...], ctx: dict) -> torch.Tensor:
            reads.append(index)
            return self.t[index]

    gates = [torch.randn(8, 3) for _ in range(4)]
    ups = [torch.randn(8, 3) for _ in range(4)]
    lg = [LazyTensor.from_source(Source(g)) for g in gates]
    lu = [LazyTensor.from_source(Source(u)) for u in ups]
    full = torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups, strict=True)])
    lazy = torch.stack([torch.cat([g, u]) for g, u in zip(lg, lu, strict=True)])
    load = gate_up_loader(1, 2, 1)
    want = load(shard(full, 0, 1, 2))
    got = load(shard(lazy, 0, 1, 2))
    assert torch.equal(got.materialize(), want)
    # experts 2, 3: rows 4:8 of gate and of up, nothing else
    assert sorted(reads) == [(slice(4, 8), slice(0, 3))] * 4
