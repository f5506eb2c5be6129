"""A quantized model (int4, groups of 32) through the serving paths (commit 3bc3bce): the prefix
cache, logprobs, prefill/decode disaggregation and a short soak, on the thread backend.

The int4 kernel computes in bf16 and its rows depend slightly on how many rows a call has
(measured: up to 0.13 per output at 1 vs 33 rows), so a prompt served from the cache (one new
row) matches a cold run in its tokens and within a bf16-sized margin in its logprobs, not bit
for bit; the same batch shapes (a cold run again, or PD at (1, 1) -> (1, 1)) match exactly.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.entrypoints.engine import Engine
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import RankGroup
from dpattn.tools.verify import reference_logits

sys.path.insert(0, str(Path(__file__).parents[1] / "disaggregation"))  # the PD harness
from pd_driver import Result, SideRun, Spec, drive_side  # noqa: E402
from pd_harness import check_groups, merged, run_pd, side_config, workload  # noqa: E402

# (the thread backend can leave its format behind: tests/conftest.py)
QUANT: dict[str, Any] = {"quantization": "int4", "quant_group_size": 32}
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPT = [5, 9, 200, 31, 77, 8, 44, 12, 19, 301, 17, 260, 3, 99]


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> Iterator[Engine]:
    with Engine(str(tiny_models["llama"]), 1, 1, backend="thread", **QUANT) as eng:
        yield eng
        assert eng.kv_pools_full() and not eng._pending


def _lp(out: dict[str, Any]) -> list[float]:
    return [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]


def test_prefix_cache(engine: Engine) -> None:
    engine.flush_cache()
    cold = engine.generate(input_ids=PROMPT, sampling_params=GREEDY, return_logprob=True)
    hit = engine.generate(input_ids=PROMPT, sampling_params=GREEDY, return_logprob=True)
    # a prompt sharing the first 10 tokens: only those come from the cache
    other = engine.generate(input_ids=PROMPT[:10] + [400, 401], sampling_params=GREEDY)
    engine.flush_cache()
    cold_again = engine.generate(input_ids=PROMPT, sampling_params=GREEDY, return_logprob=True)
    assert cold["meta_info"]["cached_tokens"] == 0
    assert hit["meta_info"]["cached_tokens"] == len(PROMPT) - 1
    assert other["meta_info"]["cached_tokens"] == 10
    assert cold_again["meta_info"]["cached_tokens"] == 0
    assert hit["output_ids"] == cold["output_ids"] == cold_again["output_ids"]
    assert _lp(cold_again) == _lp(cold)  # same batch shapes: bit for bit
    assert _lp(hit) == pytest.approx(_lp(cold), abs=0.1)  # a 1-row prefill: bf16 noise only


def test_logprobs(engine: Engine, tiny_models: dict[str, Path]) -> None:
    """Finite; each greedy token's logprob is the largest of its top logprobs; and they are the
    int4 model's (transformers with the kernel's weights), not the plain model's."""
    out = engine.generate(
        input_ids=PROMPT,
        sampling_params=GREEDY,
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    meta, ids = out["meta_info"], out["output_ids"]
    assert len(ids) == GREEDY["max_new_tokens"]
    assert meta["input_token_logprobs"][0] == (None, PROMPT[0])
    prompt_lps = [lp for lp, _ in meta["input_token_logprobs"][1:]]
    assert all(math.isfinite(lp) and lp <= 0 for lp in prompt_lps + _lp(out))
    for (lp, tok), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == tok  # greedy: the top-1 token
        assert lp == max(t for t, _ in top)
        assert [t for t, _ in top] == sorted((t for t, _ in top), reverse=True)
        assert all(math.isfinite(t) for t, _ in top)
    seq = PROMPT + ids
    positions = list(range(len(PROMPT) - 1, len(seq) - 1))
    got = torch.tensor(prompt_lps + _lp(out))

    def ref(method: str) -> torch.Tensor:
        logits = reference_logits(str(tiny_models["llama"]), "float32", {0: seq}, "cpu", method, 32)
        lsm = torch.log_softmax(logits[0], dim=-1)
        prompt = [float(lsm[p - 1, PROMPT[p]]) for p in range(1, len(PROMPT))]
        return torch.tensor(prompt + [float(lsm[p, seq[p + 1]]) for p in positions])

    # measured: 0.06 from the int4 model, 1.5 from the plain one
    assert (got - ref("int4")).abs().max() < 0.2
    assert (got - ref("none")).abs().max() > 0.4


# --------------------------------------------------------------------------- PD


def _colocated(model: Path, specs: tuple[Spec, ...], **kw: Any) -> dict[str, Result]:
    cfg = side_config(model, 1, 1, "null", 0, **kw)

    def fn(ps: ParallelState) -> SideRun:
        return drive_side(ps, cfg, specs, None, "null")

    [run] = RankGroup(fn, Layout(1, 1), "thread", timeout_s=60).wait()
    return run.outputs


def test_disaggregated_prefill_equals_colocated(tiny_models: dict[str, Path]) -> None:
    """Prefill (1, 1) -> decode (1, 1), both int4, over the real schedulers and zmq transfer:
    tokens and logprobs equal the colocated int4 run's (the same batch shapes per request)
    and differ from the plain model's, so both sides really ran quantized."""
    model = tiny_models["llama"]
    specs = workload(seed=1, n=6)
    assert any(len(s.prompt) > 8 for s in specs)  # chunked prefill on the prefill side
    p_runs, d_runs = run_pd(model, (1, 1), (1, 1), specs, prefill_kw=QUANT, decode_kw=QUANT)
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(1, 1))  # no KV slot or request row leaked
    got, ref = merged(d_runs), _colocated(model, specs, **QUANT)
    plain = _colocated(model, specs)
    diff_plain = 0.0
    for s in specs:
        g, r = got[s.rid], ref[s.rid]
        assert g.finish_reason == r.finish_reason == "length", s.rid
        assert g.ids == r.ids and len(g.ids) == s.max_new_tokens, s.rid
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=1e-4, rtol=0
        )
        n = min(len(g.logprobs), len(plain[s.rid].logprobs))
        lp = torch.tensor(g.logprobs[:n]) - torch.tensor(plain[s.rid].logprobs[:n])
        diff_plain = max(diff_plain, float(lp.abs().max()))
    assert diff_plain > 0.1, "the PD run's logprobs are the plain model's"


# --------------------------------------------------------------------------- soak

SYSTEMS = [[7, 8, 9, 10, 11, 12] * 3, [300, 301, 302] * 5, []]  # shared prefixes (and none)


def test_soak(tiny_models: dict[str, Path]) -> None:
    """200 requests of random lengths (some sharing a prefix, ~10% aborted at once) through a
    (2, 2) int4 engine with a 256-token pool per group, so requests are retracted and cached
    prefixes evicted: every request ends (length with all its tokens, or abort), and the pools
    come back full with nothing cached after a flush."""
    rng = random.Random(0)
    with Engine(
        str(tiny_models["llama"]),
        2,
        2,
        backend="thread",
        kv_pool_tokens=256,
        max_running_requests=16,
        chunked_prefill_size=16,
        **QUANT,
    ) as eng:
        sent = []
        for i in range(200):
            ids = SYSTEMS[i % 3] + [rng.randrange(3, 500) for _ in range(rng.randint(1, 30))]
            n = rng.randint(1, 12)
            rid = eng.submit(ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
            aborted = rng.random() < 0.1
            if aborted:
                eng.abort(rid)
            sent.append((rid, n, aborted))
        outcomes = []
        for rid, n, aborted in sent:
            out = eng.result(rid, timeout=120)
            reason = out["meta_info"]["finish_reason"]
            outcomes.append(reason)
            if reason == "length":
                assert len(out["output_ids"]) == n, (rid, out)
            else:
                assert reason == "abort" and aborted and len(out["output_ids"]) <= n, (rid, out)
        assert outcomes.count("length") >= 150, outcomes
        assert sum(eng.retractions) > 0, "the pool never ran short: no retraction exercised"
        assert any(eng.kv_cached), "the prefix cache was never used"
        deadline = time.monotonic() + 10  # the ranks report their pools after each step
        while not eng.kv_pools_full() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.kv_pools_full(), (eng.kv_free, eng.kv_total)
        eng.flush_cache()
        assert eng.kv_cached == [0, 0] and eng.kv_free == eng.kv_total
        assert not eng._pending
        assert eng.router.inflight == [0, 0]
