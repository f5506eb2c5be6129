"""Prompt logprobs (and top-N) from the scheduler equal transformers' log_softmax, on every
layout (vocab-parallel at attention-TP > 1), over chunked prefill, from any start position."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.messages import RequestOutput
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.schedule_batch import Req
from dpattn.scheduler.scheduler import Scheduler
from dpattn.tools.verify import reference_logits

PROMPTS = [[5, 9, 200, 31, 77, 8, 1, 2, 3, 44, 45, 46, 300], [42, 7], [300, 301, 302, 303, 9]]
STARTS = [0, 0, 3]  # logprob_start_len per prompt
TOP_N = 3


def rank_main(ps: ParallelState, model: str, chunk: int) -> dict[str, list[RequestOutput]]:
    runner = ModelRunner(RunnerConfig(model, kv_pool_tokens=256), ps)
    sched = Scheduler(runner, SchedulerConfig(chunked_prefill_size=chunk), set())
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    for i, (ids, start) in enumerate(zip(PROMPTS, STARTS)):
        if i % ps.dp_size == ps.dp_rank:
            sched.add_request(Req(str(i), ids, params, 0, True, start, TOP_N))
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(40):
        sched.step()
        for o in sched.take_outputs():
            outputs.setdefault(o.rid, []).append(o)
    return outputs


@pytest.mark.parametrize(
    "tp,dp,chunk", [(1, 1, 256), (1, 1, 4), (2, 1, 4), (2, 2, 5), (4, 2, 3), (4, 4, 4)]
)
def test_prompt_logprobs_match_transformers(
    tiny_models: dict[str, Path], tp: int, dp: int, chunk: int
) -> None:
    model = str(tiny_models["qwen3"])
    results = run_ranks(
        functools.partial(rank_main, model=model, chunk=chunk), Layout(tp, dp), "thread"
    )
    merged: dict[str, list[RequestOutput]] = {}
    for res in results:
        merged.update(res)
    ref = reference_logits(model, "float32", dict(enumerate(PROMPTS)))
    for i, (ids, start) in enumerate(zip(PROMPTS, STARTS)):
        outs = merged[str(i)]
        first: Any = outs[0]
        lsm = torch.log_softmax(ref[i], dim=-1)
        positions = range(max(1, start), len(ids))  # prompt token p is predicted at p - 1
        want = [float(lsm[p - 1, ids[p]]) for p in positions]
        assert first.input_logprobs == pytest.approx(want, abs=1e-4)
        assert len(first.input_top_logprobs) == len(want)
        for p, top in zip(positions, first.input_top_logprobs):
            vals, top_ids = lsm[p - 1].topk(TOP_N)
            assert [t for _, t in top] == top_ids.tolist()
            assert [v for v, _ in top] == pytest.approx(vals.tolist(), abs=1e-4)
        assert all(not o.input_logprobs for o in outs[1:])  # sent once, with the first token
        # output tokens: their logprob and top-N from the same distribution
        new_top = first.new_top_logprobs[0]
        assert len(new_top) == TOP_N and new_top[0][1] == first.new_ids[0]  # greedy = top-1
        assert first.new_logprobs[0] == pytest.approx(new_top[0][0], abs=1e-5)


def score_only(ps: ParallelState, model: str) -> tuple[list[RequestOutput], int, int]:
    runner = ModelRunner(RunnerConfig(model, kv_pool_tokens=64), ps)
    sched = Scheduler(runner, SchedulerConfig(chunked_prefill_size=4), set())
    free = runner.kv_pool.available_size()
    sched.add_request(Req("s", PROMPTS[0], SamplingParams(max_new_tokens=0), 0, True, 0, 0))
    outputs: list[RequestOutput] = []
    for _ in range(10):
        sched.step()
        outputs += sched.take_outputs()
    sched.flush_cache()
    return outputs, free, runner.kv_pool.available_size()


def test_max_new_tokens_zero_scores_the_prompt_only(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["qwen3"])
    [(outputs, free, free_after)] = run_ranks(
        functools.partial(score_only, model=model), Layout(1, 1), "thread"
    )
    [out] = outputs
    assert out.new_ids == [] and out.finish_reason == "length"
    lsm = torch.log_softmax(reference_logits(model, "float32", {0: PROMPTS[0]})[0], dim=-1)
    ids = PROMPTS[0]
    want = [float(lsm[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert out.input_logprobs == pytest.approx(want, abs=1e-4)
    assert free_after == free
