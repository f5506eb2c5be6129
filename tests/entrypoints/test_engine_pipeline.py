"""Pipeline stages through the Engine (issue 27): greedy tokens and logprobs at --pp-size 2 and 4
equal --pp-size 1 of the same (T, D) layout, through chunked prefill (a long prompt's middle
chunks send no output message), prompt logprobs over chunks, the prefix cache and retraction;
and a rank that dies in stage 1 stops the engine, named by its global rank and stage, without a hang.
test_server_pipeline.py does the same through `serve`."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest

from dpattn.entrypoints.engine import Engine
from dpattn.executor.sampling_params import SamplingParams
from dpattn.models.tiny import make_tiny_model
from dpattn.runtime.faults import FailAt

CHUNK = 8
NEW = 6
LONG = [3 + (i * 37) % 500 for i in range(70)]  # 9 chunks of 8
LONG_LOGPROBS = [3 + (i * 53) % 500 for i in range(45)]  # prompt logprobs over 6 chunks
SHORT = [[5, 9, 200, 31, 77, 8], [42, 7, 300]]
PREFIX = [3 + (i * 11) % 400 for i in range(30)]  # shared by a pair sent one after the other
LOGPROB_ATOL = 1e-4  # as test_engine_logprobs.py: the stages' batches are not pp 1's
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
Outputs = dict[str, Any]


@pytest.fixture(scope="module")
def moe4(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 layers (layer 0 dense, then MoE): enough for 4 stages of one layer each."""
    out = tmp_path_factory.mktemp("engine-pp") / "moe4"
    return str(make_tiny_model("qwen3_moe", out, seed=1, num_hidden_layers=4, mlp_only_layers=[0]))


def workload(engine: Engine) -> Outputs:
    """The same requests on any layout: a long prompt beside short ones without logprobs; with
    output and prompt logprobs (top 2, from position 1); a shared-prefix pair on DP group 0."""
    plain = engine.generate(input_ids=[LONG, *SHORT], sampling_params=GREEDY)
    logprobs = engine.generate(
        input_ids=[LONG_LOGPROBS, *SHORT],
        sampling_params=GREEDY,
        return_logprob=True,
        top_logprobs_num=2,
        logprob_start_len=1,
    )
    pair = [
        engine.generate(input_ids=PREFIX + tail, sampling_params=GREEDY, dp_rank=0)
        for tail in ([7, 8, 9], [10, 11])
    ]
    return {"plain": plain, "logprobs": logprobs, "pair": pair}


def _tokens(outs: Outputs) -> dict[str, list[list[int]]]:
    return {k: [o["output_ids"] for o in v] for k, v in outs.items()}


def _logprob_fields(out: dict[str, Any]) -> list[list[float]]:
    meta = out["meta_info"]
    rows = [[lp for lp, _ in meta["output_token_logprobs"]]]
    rows.append([lp for lp, _ in meta["input_token_logprobs"]])
    rows += [[lp for lp, _ in top] for top in meta["output_top_logprobs"]]
    rows += [[lp for lp, _ in top] for top in meta["input_top_logprobs"]]
    return rows


def _ids_of_logprobs(out: dict[str, Any]) -> list[Any]:
    meta = out["meta_info"]
    keys = ("output_token_logprobs", "input_token_logprobs")
    tops = ("output_top_logprobs", "input_top_logprobs")
    return [[i for _, i in meta[k]] for k in keys] + [
        [i for _, i in t] for k in tops for t in meta[k]
    ]


def assert_equal_outputs(got: Outputs, want: Outputs) -> None:
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got["logprobs"], want["logprobs"]):
        assert _ids_of_logprobs(g) == _ids_of_logprobs(w)  # the same alternatives, in order
        for row_g, row_w in zip(_logprob_fields(g), _logprob_fields(w), strict=True):
            assert row_g == pytest.approx(row_w, abs=LOGPROB_ATOL)
    prompt = got["logprobs"][0]["meta_info"]["input_token_logprobs"]
    assert len(prompt) == len(LONG_LOGPROBS) - 1  # every chunk's prompt logprobs came back


def run(model: str, tp: int, dp: int, pp: int, backend: str = "thread") -> tuple[Outputs, Engine]:
    engine = Engine(model, tp, dp, backend=backend, pp_size=pp, chunked_prefill_size=CHUNK)
    with engine:
        outs = workload(engine)
    return outs, engine


_REFERENCE: dict[tuple[str, int, int], Outputs] = {}


def reference(model: str, tp: int, dp: int) -> Outputs:
    """--pp-size 1 of the layout (threads), once per module."""
    if (model, tp, dp) not in _REFERENCE:
        outs, _ = run(model, tp, dp, 1)
        second = outs["pair"][1]["meta_info"]["cached_tokens"]
        assert second > 0, "pp 1: the second of the pair hit no cached prefix"
        _REFERENCE[(model, tp, dp)] = outs
    return _REFERENCE[(model, tp, dp)]


@pytest.mark.parametrize(
    "tp,dp,pp,backend",
    [
        (1, 1, 2, "thread"),
        (2, 2, 2, "thread"),
        (1, 1, 4, "thread"),
        pytest.param(1, 1, 2, "gloo", marks=pytest.mark.gloo),
    ],
    ids=["pp2", "pp2-tp2-dp2", "pp4", "pp2-gloo"],
)
def test_pipeline_equals_one_stage(moe4: str, tp: int, dp: int, pp: int, backend: str) -> None:
    want = reference(moe4, tp, dp)
    got, engine = run(moe4, tp, dp, pp, backend)
    assert_equal_outputs(got, want)
    pair = [o["meta_info"]["cached_tokens"] for o in got["pair"]]
    assert pair[1] > 0 and pair[1] == want["pair"][1]["meta_info"]["cached_tokens"], pair
    assert engine.kv_free == engine.kv_total, "KV slots leaked"
    # Every rank reports its stage's counters; a stage's ranks (and the stages) agree.
    results = engine.rank_results
    assert [r["pp_rank"] for r in results] == [g // tp for g in range(tp * pp)]
    counters = [r["pipeline"] for r in results]
    for d in range(dp):  # each DP group's lane: its own micro-batches
        lane = [counters[s * tp + d * (tp // dp)] for s in range(pp)]
        counts = {(c["outputs_sent"], c["outputs_skipped"]) for c in lane}
        assert len(counts) == 1, f"DP group {d}: the stages counted differently: {counts}"
    long_group = counters[0]  # the long prompt went to DP group 0 (round robin, first)
    assert long_group["outputs_skipped"] >= len(LONG) // CHUNK - 1, long_group
    assert all(0 < c["busy_s"] <= c["active_s"] for c in counters), counters


def test_retraction_equals_one_stage(moe4: str) -> None:
    """A pool too small for the requests together: they retract and replay identically."""
    prompts = [[7 + i] * 10 for i in range(4)]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    outs, retractions = [], []
    for pp in (1, 2):
        with Engine(
            moe4, backend="thread", pp_size=pp, chunked_prefill_size=CHUNK, kv_pool_tokens=48
        ) as engine:
            outs.append(
                [
                    o["output_ids"]
                    for o in engine.generate(input_ids=prompts, sampling_params=params)
                ]
            )
            retractions.append(sum(engine.retractions))
    assert outs[1] == outs[0]
    assert all(retractions), f"nothing retracted: {retractions}"


@pytest.mark.gloo
def test_dead_rank_in_stage_one_stops_the_engine(moe4: str) -> None:
    """Stage 1's rank (global rank 1) exits mid-request: the request fails naming rank 1, the
    engine refuses new work, and no rank is left behind, all within the collective timeout."""
    timeout = 20
    engine = Engine(
        moe4, backend="gloo", pp_size=2, collective_timeout_s=timeout, fault=FailAt(1, step=40)
    )
    try:
        assert engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
        start = time.monotonic()
        rid = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
        with pytest.raises(RuntimeError, match=r"rank 1 \(stage 1\) died \(exit code 3\)"):
            engine.result(rid, timeout=timeout)
        while any(p.is_alive() for p in engine.ranks.procs) and time.monotonic() < start + timeout:
            time.sleep(0.1)
        assert not any(p.is_alive() for p in engine.ranks.procs)
        assert time.monotonic() - start < timeout
        with pytest.raises(RuntimeError, match=r"rank 1 \(stage 1\) died"):
            engine.submit([1], SamplingParams())
    finally:
        engine.shutdown()
    assert mp.active_children() == []


def test_failing_rank_thread_is_named_with_its_stage(moe4: str) -> None:
    """Rank threads: the error the engine reports names the rank that raised, and its stage."""
    engine = Engine(moe4, backend="thread", pp_size=2, fault=FailAt(1, step=40, exit=False))
    try:
        rid = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
        with pytest.raises(RuntimeError, match=r"rank 1 \(stage 1\): injected fault at step 40"):
            engine.result(rid, timeout=30)
    finally:
        engine.shutdown()
