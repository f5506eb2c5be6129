"""ModelRunner on the thread backend: gather-metadata checks, lock-step traces, KV pool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dpattn.config import RunnerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.forward_batch import ForwardBatch, ForwardMode
from dpattn.executor.model_runner import ModelRunner
from dpattn.runtime.launch import run_ranks
from dpattn.tools.verify import reference_logits

PROMPT_LEN = 5  # odd: needs attn_tp padding for A = 2 and 4
KV_TOKENS = 256


def prompt(dp_rank: int, n: int = PROMPT_LEN, vocab: int = 300) -> list[int]:
    """Deterministic per DP group, so the attn_tp ranks of one group agree."""
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def make_runner(ps: ParallelState, model: Path, **kw: Any) -> ModelRunner:
    return ModelRunner(RunnerConfig(str(model), kv_pool_tokens=KV_TOKENS, **kw), ps)


def extend_batch(
    runner: ModelRunner, tokens: list[int], extra: int = 0
) -> tuple[ForwardBatch, int, torch.Tensor]:
    """One request's prefill, as verify.rank_main builds it: row + slots (with room for extra)."""
    n = len(tokens)
    row = runner.req_to_token.alloc()
    slots = runner.kv_pool.alloc(n + extra)
    assert row is not None and slots is not None
    runner.req_to_token.table[row, : slots.numel()] = slots
    batch = ForwardBatch(
        ForwardMode.EXTEND,
        torch.tensor(tokens),
        torch.arange(n),
        slots[:n],
        [row],
        [n],
        [n],
    )
    return batch, row, slots


def decode_batch(
    runner: ModelRunner, token: int, row: int, slots: torch.Tensor, pos: int
) -> ForwardBatch:
    return ForwardBatch(
        ForwardMode.DECODE,
        torch.tensor([token]),
        torch.tensor([pos]),
        slots[pos : pos + 1],
        [row],
        [pos + 1],
        [1],
    )


def mlp_sync(ps: ParallelState, batch: ForwardBatch) -> None:
    """Stand-in for the scheduler's MLP sync: gather metadata from the DP group leaders."""
    local = (batch.num_tokens, batch.forward_mode.is_extend_like())
    rows = ps.world_cpu.all_gather_object(local)[:: ps.attn_tp_size]
    batch.global_num_tokens = [n for n, _ in rows]
    batch.is_extend_in_batch = any(e for _, e in rows)


def run(fn: Callable[[ParallelState], Any], tp: int, dp: int) -> list[Any]:
    return run_ranks(fn, Layout(tp, dp), backend="thread", timeout_s=30)


def hf_last_logits(model: Path, tokens: list[int]) -> torch.Tensor:
    return reference_logits(str(model), "float32", {0: tokens})[0][-1]


# --------------------------------------------------------------------------- gather metadata


@pytest.mark.parametrize(
    "model,tp,dp,dense_tp",
    [
        ("llama", 2, 1, 1),  # dp=1 but the scattered dense MLP needs attn_tp padding
        ("qwen3_moe_mixed", 2, 1, 1),
        ("llama", 2, 2, None),
        ("qwen3_moe", 2, 2, None),
        ("llama", 4, 2, 1),
    ],
)
def test_missing_gather_metadata_raises(
    all_models: dict[str, Path], model: str, tp: int, dp: int, dense_tp: int | None
):
    def fn(ps: ParallelState) -> None:
        runner = make_runner(ps, all_models[model], moe_dense_tp_size=dense_tp)
        batch, _, _ = extend_batch(runner, prompt(ps.dp_rank))
        assert batch.global_num_tokens is None
        runner.forward(batch)

    with pytest.raises(ValueError, match="gather metadata"):
        run(fn, tp, dp)


@pytest.mark.parametrize(
    "model,tp,dp,dense_tp",
    [
        ("llama", 1, 1, None),
        ("llama", 2, 1, None),
        ("qwen3_moe", 2, 1, None),
        ("llama", 1, 1, 1),  # A = 1: nothing to pad, the scattered layout is trivial
        ("qwen3_moe", 2, 1, 1),  # no dense layer, so nothing is scattered
    ],
)
def test_without_gather_metadata_runs(
    all_models: dict[str, Path], model: str, tp: int, dp: int, dense_tp: int | None
):
    tokens = prompt(0)

    def fn(ps: ParallelState) -> torch.Tensor:
        runner = make_runner(ps, all_models[model], moe_dense_tp_size=dense_tp)
        assert not runner.needs_gather_metadata
        batch, _, _ = extend_batch(runner, tokens)
        return runner.forward(batch)

    outs = run(fn, tp, dp)
    ref = hf_last_logits(all_models[model], tokens)
    for out in outs:
        assert out.shape == (1, ref.numel())
        torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model,tp", [("llama", 1), ("qwen3_moe", 2)])
def test_prepacked_weights_equal_plain(all_models: dict[str, Path], model: str, tp: int) -> None:
    """oneDNN-packed projections (the CPU default) give the plain weights' logits; the plain
    copies are gone (a packed weight replaces its parameter)."""
    tokens = prompt(0)

    def fn(ps: ParallelState) -> list[torch.Tensor]:
        outs = []
        for disable in (False, True):
            runner = make_runner(ps, all_models[model], disable_weight_prepack=disable)
            params = dict(runner.model.named_parameters())
            attn = runner.model.layers[0].self_attn
            assert (attn.qkv_proj is not None and attn.qkv_proj.is_mkldnn) is not disable
            assert attn.o_proj.is_mkldnn is not disable
            assert ("layers.0.self_attn.q_proj" in params) is disable
            assert ("lm_head.weight" in params) is disable  # untied: the head is only logits
            batch, _, _ = extend_batch(runner, tokens)
            outs.append(runner.forward(batch))
        return outs

    for packed, plain in run(fn, tp, 1):
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "tp,dp,gnt",
    [
        (2, 2, [PROMPT_LEN + 1, 0]),  # this group's entry is not its token count
        (2, 2, [PROMPT_LEN, 1]),  # the idle group's entry is wrong
        (4, 2, [PROMPT_LEN - 1, 0]),
        (2, 2, [PROMPT_LEN]),  # wrong length (dp_size entries expected)
        (2, 1, [PROMPT_LEN + 1]),
        (1, 1, [PROMPT_LEN, 0]),
    ],
)
def test_wrong_gather_metadata_raises(
    tiny_models: dict[str, Path], tp: int, dp: int, gnt: list[int]
):
    def fn(ps: ParallelState) -> None:
        runner = make_runner(ps, tiny_models["llama"])
        if ps.dp_rank == 0:
            batch, _, _ = extend_batch(runner, prompt(0))
        else:
            batch = ForwardBatch.idle()
        batch.global_num_tokens = list(gnt)
        batch.is_extend_in_batch = True
        runner.forward(batch)

    with pytest.raises(ValueError, match="does not match"):
        run(fn, tp, dp)


# --------------------------------------------------------------------------- lock-step trace

TRACE_CASES = [
    # model, tp, dp, runner options
    ("llama", 4, 2, {}),
    ("llama", 4, 2, {"dp_padding_mode": "max_len"}),
    ("llama", 4, 2, {"moe_dense_tp_size": 1}),
    ("qwen3_moe", 4, 2, {}),
    ("qwen3_moe", 4, 2, {"ep": True, "dp_padding_mode": "max_len"}),
    ("qwen3_moe_mixed", 4, 2, {"moe_dense_tp_size": 1}),
    ("mixtral", 4, 4, {"ep": True}),
    ("qwen3", 2, 2, {"dp_padding_mode": "max_len"}),
]


@pytest.mark.parametrize("model,tp,dp,opts", TRACE_CASES)
def test_idle_group_issues_identical_collectives(
    all_models: dict[str, Path], model: str, tp: int, dp: int, opts: dict[str, Any]
):
    """DP group 0 prefills, the others are IDLE: every rank issues the same world collectives
    with the same shapes, and the ranks of one DP group issue the same sequence overall."""
    tokens = prompt(0)
    gnt = [len(tokens)] + [0] * (dp - 1)

    def fn(ps: ParallelState) -> tuple[list, torch.Tensor, bool]:
        runner = make_runner(ps, all_models[model], **opts)
        all_scattered = all(layer.scattered for layer in runner.model.layers)
        if ps.dp_rank == 0:
            batch, _, _ = extend_batch(runner, tokens)
        else:
            batch = ForwardBatch.idle()
        batch.global_num_tokens = list(gnt)
        batch.is_extend_in_batch = True
        ps.trace.take()  # drop whatever model construction issued
        logits = runner.forward(batch)
        return ps.trace.take(), logits, all_scattered

    results = run(fn, tp, dp)
    layout = Layout(tp, dp)
    traces = [t for t, _, _ in results]
    world = [[c for c in t if c[0] == "world"] for t in traces]
    if results[0][2]:  # every layer dense and scattered: DP groups never meet at all
        assert world[0] == []
    else:
        assert world[0], "no world collective in a forward step"
    for r in range(tp):
        assert world[r] == world[0], f"rank {r} world collectives differ from rank 0"
        lead = layout.dp_rank(r) * layout.attn_tp_size
        assert traces[r] == traces[lead], f"rank {r} differs from its DP group leader {lead}"
        assert all(c[0] in ("world", f"attn_tp{layout.dp_rank(r)}") for c in traces[r])
    # Outputs: the busy group's last-token logits match HF, idle groups return no rows.
    ref = hf_last_logits(all_models[model], tokens)
    for r, (_, logits, _) in enumerate(results):
        if layout.dp_rank(r) == 0:
            torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=0)
        else:
            assert logits.shape[0] == 0


# --------------------------------------------------------------------------- KV pool


@pytest.mark.parametrize("tp,dp,dense_tp", [(1, 1, None), (2, 1, 1), (2, 2, None), (4, 2, None)])
def test_kv_pool_returns_to_initial_size(
    tiny_models: dict[str, Path], tp: int, dp: int, dense_tp: int | None
):
    decode_steps = 3

    def fn(ps: ParallelState) -> None:
        runner = make_runner(ps, tiny_models["llama"], moe_dense_tp_size=dense_tp)
        kv0, rows0 = runner.kv_pool.available_size(), runner.req_to_token.available_size()
        assert kv0 == KV_TOKENS and rows0 == runner.cfg.max_running_requests

        # Plain alloc / free, including an allocation that cannot be served.
        a, b = runner.kv_pool.alloc(7), runner.kv_pool.alloc(0)
        assert a is not None and a.numel() == 7 and b is not None and b.numel() == 0
        assert runner.kv_pool.alloc(KV_TOKENS) is None
        assert runner.kv_pool.available_size() == kv0 - 7
        runner.kv_pool.free(a)
        runner.kv_pool.free(b)
        assert runner.kv_pool.available_size() == kv0

        # A prefill and a few decode steps (idle groups join every step), then finish.
        tokens = prompt(ps.dp_rank)
        busy = ps.dp_rank == 0
        if busy:
            batch, row, slots = extend_batch(runner, tokens, extra=decode_steps)
            assert runner.kv_pool.available_size() == kv0 - len(tokens) - decode_steps
            assert runner.req_to_token.available_size() == rows0 - 1
        else:
            batch = ForwardBatch.idle()
        for step in range(decode_steps + 1):
            mlp_sync(ps, batch)
            assert batch.is_extend_in_batch == (step == 0)
            logits = runner.forward(batch)
            if busy:
                tokens.append(int(logits[0].argmax()))
                batch = decode_batch(runner, tokens[-1], row, slots, len(tokens) - 1)
        if busy:
            used = slots[: len(tokens) - 1]
            # Padding rows never reach the KV pool: only the request's own slots were written.
            untouched = torch.ones(KV_TOKENS, dtype=torch.bool)
            untouched[used] = False
            for layer in range(runner.hf_config.num_hidden_layers):
                slots_k = runner.kv_pool.k[layer][:KV_TOKENS]  # past them: the padding slot
                assert slots_k[untouched].abs().sum() == 0
                assert slots_k[used].abs().sum(dim=(1, 2)).min() > 0
            runner.kv_pool.free(slots)
            runner.req_to_token.free(row)
        assert runner.kv_pool.available_size() == kv0
        assert runner.req_to_token.available_size() == rows0
        assert sorted(runner.kv_pool.free_slots().tolist()) == list(range(KV_TOKENS))

    run(fn, tp, dp)
