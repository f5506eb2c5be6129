"""The effective limits (issue 11, item 2): the pool bounds the context, a request that can never
fit is refused at admission, one that fits alone is never aborted for lack of KV (retracted and
resumed with the same tokens), and a chat request without max_tokens gets the rest of the
effective context."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from server_harness import ServerThread, _wait_for, reported_kv

from dpattn.config import RunnerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.entrypoints.engine import Engine
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.models.tiny import ensure_default_model
from dpattn.runtime.launch import run_ranks

POOL = 64
TINY = str(ensure_default_model())  # context 512


@pytest.fixture(scope="module")
def small_pool() -> Iterator[Engine]:
    engine = Engine(TINY, 2, 2, backend="thread", kv_pool_tokens=POOL)
    try:
        yield engine
        assert _wait_for(engine.kv_pools_full), "KV slots leaked"
    finally:
        engine.shutdown()


def test_pool_bounds_the_context_and_admission_refuses_what_never_fits(
    small_pool: Engine,
) -> None:
    assert small_pool.kv_total == [POOL, POOL]
    assert small_pool.context_length == POOL  # min(model context 512, pool)
    with pytest.raises(ValueError, match=r"10 prompt \+ 60 new = 70 tokens.*context length 64"):
        small_pool.generate(input_ids=list(range(1, 11)), sampling_params={"max_new_tokens": 60})


def test_requests_that_fit_alone_are_retracted_never_aborted(small_pool: Engine) -> None:
    """Four requests of 60 tokens each on a 64-slot pool per group: only one fits at a time."""
    greedy = SamplingParams(max_new_tokens=36, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 500 + 1 for j in range(24)] for i in range(4)]
    alone = [
        small_pool.generate(input_ids=p, sampling_params=vars(greedy), dp_rank=0)["output_ids"]  # type: ignore[index]
        for p in prompts
    ]
    rids = [small_pool.submit(p, greedy, dp_rank=0) for p in prompts]
    outs = [small_pool.result(rid) for rid in rids]
    assert [o["meta_info"]["finish_reason"] for o in outs] == ["length"] * 4
    assert [o["output_ids"] for o in outs] == alone


def test_effective_limits_over_http(small_pool: Engine) -> None:
    srv = ServerThread(small_pool)
    try:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["max_model_len"] == POOL
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5] * 50, "max_tokens": 20})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 64 tokens" in r.json()["error"]["message"]
        body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == POOL  # the rest of it
        assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        srv.stop()


def test_context_length_flag_and_memory_sized_pool() -> None:
    with Engine(TINY, 1, 1, backend="thread", kv_pool_tokens=POOL, context_length=40) as e:
        assert e.context_length == 40
    # Sized from memory: more than two requests at full context could never use, so capped.
    with Engine(TINY, 2, 2, backend="thread", max_running_requests=2) as e:
        assert e.kv_total == [2 * 512, 2 * 512] and e.context_length == 512
        assert "mem_fraction_static=0.3" in e.kv_source and "capped" in e.kv_source


def runner_kv(tp: int, dp: int) -> tuple[int, int]:
    """(KV bytes per token, pool slots) of every rank's own ModelRunner at this layout."""

    def fn(ps: ParallelState) -> tuple[int, int]:
        runner = ModelRunner(RunnerConfig(TINY, kv_pool_tokens=POOL), ps)
        return runner.kv_budget.bytes_per_token, runner.kv_pool.size

    figures = set(run_ranks(fn, Layout(tp, dp), "thread"))
    assert len(figures) == 1  # every rank alike
    return figures.pop()


def test_start_up_reports_kv_bytes_per_token_and_capacity(
    small_pool: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 24 item 6: the KV bytes per token per rank and the capacity per DP group and for
    the system, as the ranks' runners have them. GQA: at A = 2 a rank holds half the KV heads
    of every request, so half the bytes per token; at A = 1 each group holds its own tokens."""
    per_token, slots = runner_kv(2, 2)
    assert small_pool.kv_bytes_per_token == per_token
    assert small_pool.kv_capacity_tokens == 2 * slots
    assert reported_kv(small_pool.kv_summary()) == (per_token, slots, 2 * slots)
    with caplog.at_level(logging.INFO, logger="dpattn.entrypoints.engine"):
        with Engine(TINY, 2, 1, backend="thread", kv_pool_tokens=POOL) as tp_attention:
            assert tp_attention.kv_capacity_tokens == POOL
    per_token_tp, slots_tp = runner_kv(2, 1)
    assert per_token_tp * 2 == per_token  # two KV heads: one per attention-TP rank
    logged = [r.getMessage() for r in caplog.records if "KV cache:" in r.getMessage()]
    assert len(logged) == 1 and reported_kv(logged[0]) == (per_token_tp, slots_tp, slots_tp)
