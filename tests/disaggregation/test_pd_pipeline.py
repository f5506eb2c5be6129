"""A prefill server with pipeline stages (--pp-size 2) behind the PD router: each stage sends its
own layers' KV to the decode server, whose layout knows nothing of stages. Greedy tokens and
logprobs equal a colocated server's; aborts and a missing decode side end their requests and
give every KV slot back on both sides (docs/design.md §8, disaggregation/prefill_pipeline.py)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pd_servers import PDStack, wait_for
from proc_harness import Uvicorn
from test_pd_http import PROMPTS, generate, metrics, same

from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import BootstrapInfo

LONG = list(range(3, 63))  # 60 tokens: 8 chunks of 8, over consecutive micro-batches


@pytest.fixture(scope="module")
def colocated(tiny_models: dict[str, Path]) -> Iterator[str]:
    engine = Engine(
        str(tiny_models["llama"]), 1, 1, backend="thread", kv_pool_tokens=256,
        disable_radix_cache=True,
    )  # fmt: skip
    srv = Uvicorn(create_app(engine))
    try:
        yield srv.url
    finally:
        srv.stop()
        engine.shutdown()


def prompt_logprobs(url: str) -> dict:
    body = {
        "input_ids": LONG,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
    }
    resp = httpx.post(url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def pp_stack(
    model: Path,
    prefill: tuple[int, int],
    decode: tuple[int, int] = (2, 2),
    backend: str = "thread",
    **kw: object,
) -> PDStack:
    options = dict(pp_size=2, **kw)
    return PDStack(model, prefill, decode, backend=backend, prefill_options=options)


# Rank threads by default; with DPATTN_PD_GLOO=1 also gloo rank processes (2 prefill stages and
# one decode rank: the stages' control messages and the lane decisions pickled over gloo).
LAYOUTS = [((1, 1), (2, 2), "thread"), ((2, 1), (2, 2), "thread")]
if os.environ.get("DPATTN_PD_GLOO") == "1":
    LAYOUTS.append(((1, 1), (1, 1), "gloo"))


@pytest.mark.parametrize("prefill,decode,backend", LAYOUTS, ids=str)
def test_pp_prefill_through_the_router_matches_colocated(
    tiny_models: dict[str, Path],
    colocated: str,
    prefill: tuple[int, int],
    decode: tuple[int, int],
    backend: str,
) -> None:
    stack = pp_stack(tiny_models["llama"], prefill, decode, backend)
    try:
        url = stack.router.url
        for ids in [*PROMPTS, LONG]:
            same(generate(url, ids, 6), generate(colocated, ids, 6))
        # Prompt logprobs and top logprobs: the prefill side's, in every stage's aux alike.
        a, b = prompt_logprobs(url), prompt_logprobs(colocated)
        assert a["output_ids"] == b["output_ids"]
        # Top alternatives of the output tokens: the same ids, the same logprobs.
        got, want = a["meta_info"]["output_top_logprobs"], b["meta_info"]["output_top_logprobs"]
        assert len(got) == len(want) == 3
        assert [[t[1] for t in pos] for pos in got] == [[t[1] for t in pos] for pos in want]
        flat = [t[0] for pos in got for t in pos]
        assert flat == pytest.approx([t[0] for pos in want for t in pos], abs=1e-4)
        assert len(a["meta_info"]["input_token_logprobs"]) == len(LONG)
        la = [x[0] for x in a["meta_info"]["input_token_logprobs"][1:]]
        lb = [x[0] for x in b["meta_info"]["input_token_logprobs"][1:]]
        assert la == pytest.approx(lb, abs=1e-4)
        for engine in stack.engines:
            assert wait_for(lambda e=engine: e.kv_pools_full()), "KV slots leaked"
        for srv in (stack.prefill, stack.decode):
            m = metrics(srv.url)
            assert m[("dpattn_disagg_transfers_total", "failed")] == 0
            assert m[("dpattn_disagg_transfer_bytes_total", "")] > 0
    finally:
        stack.close()


def submit(engine: Engine, ids: list[int], port: int, room: int, new: int = 4) -> str:
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    return engine.submit(ids, params, bootstrap=BootstrapInfo("127.0.0.1", port, room))


def test_pp_prefill_aborts_and_timeouts_end_requests_and_free_both_sides(
    tiny_models: dict[str, Path], colocated: str
) -> None:
    """Decisions taken on stage 0's clock (a bootstrap timeout) and aborts, at every point of
    the prefill's queues, are applied by both stages alike: the lane's schedulers stay equal (a
    divergence fails the engine at the next micro-batch), every request ends, no slot leaks."""
    # Chunks of 2: the 200-token prompt takes 100 micro-batches, so the abort lands mid-way.
    kw = dict(disaggregation_bootstrap_timeout_s=1.5, chunked_prefill_size=2)
    stack = pp_stack(tiny_models["llama"], (1, 1), **kw)
    pre, dec, port = stack.prefill_engine, stack.decode_engine, stack.bootstrap_port
    rng = random.Random(7)
    try:
        # No decode side for it: no handshake, timed out on stage 0, failed on both stages.
        lone = submit(pre, LONG, port, rng.getrandbits(62))
        # Aborted in the bootstrap queue (no decode side either).
        waiting = submit(pre, LONG, port, rng.getrandbits(62))
        pre.abort(waiting)
        # Aborted while its chunks run (or earlier): the decode side hears why.
        long_prompt = list(range(3, 203))
        room = rng.getrandbits(62)
        d_rid = submit(dec, long_prompt, port, room)
        p_rid = submit(pre, long_prompt, port, room)
        assert wait_for(lambda: pre.kv_used() > 0, 20), "its chunks never ran"
        pre.abort(p_rid)
        for rid in (waiting, p_rid):
            got = pre.result(rid, timeout=30)
            assert got["meta_info"]["finish_reason"] == "abort"
            assert got["output_ids"] == []  # before its first token
        lone_meta = pre.result(lone, timeout=30)["meta_info"]
        assert lone_meta["finish_reason"] == "abort"
        assert "no handshake" in lone_meta["error"]
        d_meta = dec.result(d_rid, timeout=30)["meta_info"]
        assert d_meta["finish_reason"] == "abort"
        assert "aborted on the prefill server" in d_meta["error"]
        # The lane is still in step: a normal request through the router equals colocated.
        same(generate(stack.router.url, LONG, 5), generate(colocated, LONG, 5))
        for engine in stack.engines:
            assert wait_for(lambda e=engine: e.kv_pools_full()), "KV slots leaked"
    finally:
        stack.close()
