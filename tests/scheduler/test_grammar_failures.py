"""Constrained decoding when things go wrong, through the Engine (thread backend): grammar
failures on the ranks (400, nothing leaked), the attn_tp ranks' agreement when one rank's compile
is slow or fails, an abort in the grammar queue, and --debug-lockstep with grammars."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from grammar_engines import (
    EBNF,
    GRAMMARS,
    LAYOUTS,
    LONG_PROMPT,
    PROMPTS,
    REGEX,
    assert_idle,
    check_done,
    final_delta,
    plain_params,
    thread_engine,
)
from grammar_faults import fail_compiles

from dpattn.entrypoints.engine import Engine
from dpattn.executor.grammar import XGrammarBackend
from dpattn.executor.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)  # an agreement bug hangs: fail instead

# ---- grammars that fail on the ranks ----


def _fails_with_400(engine: Engine, prompt: str, params: dict[str, Any], words: str) -> None:
    ids = engine.tokenizer.encode(prompt)
    rid = engine.submit(ids, SamplingParams.from_dict(params))
    end = final_delta(engine, rid)
    assert end.finish_reason == "abort"
    assert end.error_status == 400
    assert words in end.error, end.error


def _serves_after(engine: Engine) -> None:
    plain = engine.generate(prompt=PROMPTS[0], sampling_params=plain_params())
    assert len(plain["output_ids"]) == 12
    assert_idle(engine)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_grammar_backend_none(model: str, tp: int, dp: int) -> None:
    with thread_engine(model, tp, dp, grammar_backend="none") as engine:
        for kind in GRAMMARS:
            p = {"max_new_tokens": 8, kind: GRAMMARS[kind]}
            _fails_with_400(engine, PROMPTS[0], p, "constrained decoding is off")
        # Beside plain requests (sent together): they are served, the grammar one fails.
        rids = [
            engine.submit(engine.tokenizer.encode(p), SamplingParams.from_dict(sp))
            for p, sp in [
                (PROMPTS[0], plain_params()),
                (PROMPTS[1], {"max_new_tokens": 8, "regex": REGEX}),
                (PROMPTS[2], plain_params()),
            ]
        ]
        ends = [final_delta(engine, rid) for rid in rids]
        assert [e.finish_reason for e in ends] == ["length", "abort", "length"]
        assert ends[1].error_status == 400 and ends[0].error_status == 0
        _serves_after(engine)


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every compile of a regex containing "boom" fails, on every rank."""
    fail_compiles(monkeypatch)


@pytest.mark.parametrize("tp,dp", LAYOUTS)
def test_compile_failure_ends_request_with_400(
    model: str, eos: int, tp: int, dp: int, boom: None
) -> None:
    with thread_engine(model, tp, dp) as engine:
        for _ in range(2):  # the second from the failure cache
            _fails_with_400(
                engine,
                PROMPTS[0],
                {"max_new_tokens": 8, "regex": "boom|bang"},
                "regex: the compiler went boom",
            )
        ok = engine.generate(
            prompt=PROMPTS[0], sampling_params={"max_new_tokens": 96, "regex": REGEX}
        )
        check_done(ok, "regex", eos)
        _serves_after(engine)


# ---- agreement inside a DP group (attn_tp 2) ----


class RankFault:
    """XGrammarBackend patched so that only one rank thread's compiles misbehave: fail, sleep,
    or block on a gate (which the fixture opens at the end)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rank = "rank1"
        self.mode = "fail"
        self.gate = threading.Event()
        self.started = threading.Event()  # a blocked compile began: its request is queued
        self.seen: set[str] = set()
        init, compile_ = XGrammarBackend.__init__, XGrammarBackend._compile
        fault = self

        def patched_init(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            self.rank_thread = threading.current_thread().name  # the scheduler's thread

        def patched_compile(self: Any, key: tuple[str, str]) -> Any:
            fault.seen.add(self.rank_thread)
            if self.rank_thread == fault.rank:
                if fault.mode == "fail":
                    raise RuntimeError(f"only {fault.rank} failed")
                if fault.mode == "slow":
                    time.sleep(0.5)
                if fault.mode == "block":
                    fault.started.set()
                    assert fault.gate.wait(30)
            return compile_(self, key)

        monkeypatch.setattr(XGrammarBackend, "__init__", patched_init)
        monkeypatch.setattr(XGrammarBackend, "_compile", patched_compile)


@pytest.fixture
def rank_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[RankFault]:
    fault = RankFault(monkeypatch)
    yield fault
    fault.gate.set()


@pytest.mark.parametrize("rank", ["rank0", "rank1"])
def test_one_rank_fails_the_whole_group(model: str, rank_fault: RankFault, rank: str) -> None:
    rank_fault.rank = rank
    with thread_engine(model, 2, 1, debug_lockstep=True) as engine:
        # Whichever rank failed, its reason reaches the client (the ranks gather them).
        why = f"only {rank} failed"
        for _ in range(2):
            _fails_with_400(engine, PROMPTS[0], {"max_new_tokens": 8, "regex": REGEX}, why)
        assert rank_fault.seen == {"rank0", "rank1"}
        _serves_after(engine)


def test_one_slow_rank_is_waited_for(model: str, eos: int, rank_fault: RankFault) -> None:
    rank_fault.mode = "slow"
    with thread_engine(model, 2, 1, debug_lockstep=True) as engine:
        t0 = time.monotonic()
        outs = engine.generate(
            prompt=PROMPTS[:2] + PROMPTS[:1],
            sampling_params=[
                {"max_new_tokens": 96, "temperature": 1.0, "seed": 1, "regex": REGEX},
                plain_params(),  # not held back by the grammar's compile
                {"max_new_tokens": 96, "temperature": 1.0, "seed": 2, "ebnf": EBNF},
            ],
        )
        assert time.monotonic() - t0 >= 0.5
        check_done(outs[0], "regex", eos)
        check_done(outs[2], "ebnf", eos)
        assert len(outs[1]["output_ids"]) == 12
        assert max(s.grammar_queue for _, s in engine.step_stats) >= 1
        assert_idle(engine)


def test_one_rank_times_out(model: str, eos: int, rank_fault: RankFault) -> None:
    rank_fault.mode = "block"
    with thread_engine(model, 2, 1, grammar_compile_timeout=0.3, debug_lockstep=True) as engine:
        _fails_with_400(
            engine,
            PROMPTS[0],
            {"max_new_tokens": 8, "regex": REGEX},
            "timed out after 0.3 s",  # rank1's reason, gathered by the leader
        )
        rank_fault.rank = "rank0"  # now the leader is the stuck one: it names the timeout
        _fails_with_400(
            engine, PROMPTS[0], {"max_new_tokens": 8, "ebnf": EBNF}, "timed out after 0.3 s"
        )
        _serves_after(engine)
        rank_fault.gate.set()  # the stuck compiles end: the same grammars now work
        deadline = time.monotonic() + 10
        while True:
            out = engine.generate(
                prompt=PROMPTS[0], sampling_params={"max_new_tokens": 96, "regex": REGEX}
            )
            if out["meta_info"]["finish_reason"] == "stop" or time.monotonic() > deadline:
                break
        check_done(out, "regex", eos)
        assert_idle(engine)


# ---- abort in the grammar queue ----


@pytest.mark.parametrize("tp,dp", [*LAYOUTS, (2, 1)])  # (2, 1): rank1 has it, rank0 not
def test_abort_while_waiting_for_the_grammar(
    model: str, eos: int, tp: int, dp: int, rank_fault: RankFault
) -> None:
    rank_fault.mode = "block"
    rank_fault.rank = "rank0"
    with thread_engine(model, tp, dp) as engine:
        ids = engine.tokenizer.encode(PROMPTS[0])
        rid = engine.submit(ids, SamplingParams(max_new_tokens=8, regex=REGEX), dp_rank=0)
        assert rank_fault.started.wait(10), "the request never reached the grammar queue"
        engine.abort(rid)
        end = final_delta(engine, rid)
        assert end.finish_reason == "abort" and end.error_status == 0
        _serves_after(engine)
        rank_fault.gate.set()
        out = engine.generate(
            prompt=PROMPTS[0], sampling_params={"max_new_tokens": 96, "regex": REGEX}
        )
        check_done(out, "regex", eos)
        assert engine.step_stats[-1][1].grammar_queue == 0
        assert_idle(engine)


# ---- lock-step ----


def test_debug_lockstep_with_grammars(model: str, eos: int, boom: None) -> None:
    """Every collective checked across ranks at (2, 2): grammars of every kind, plain requests,
    a failing grammar and a chunked prefill in one workload run clean."""
    kinds = list(GRAMMARS) * 2
    with thread_engine(model, 2, 2, debug_lockstep=True, chunked_prefill_size=16) as engine:
        outs = engine.generate(
            prompt=[LONG_PROMPT, *PROMPTS, *PROMPTS[:2]],
            sampling_params=[
                {"max_new_tokens": 120, "temperature": 1.0, "seed": i, k: GRAMMARS[k]}
                for i, k in enumerate(kinds)
            ]
            + [plain_params()],
        )
        for kind, out in zip(kinds, outs):
            check_done(out, kind, eos)
        _fails_with_400(engine, PROMPTS[0], {"max_new_tokens": 8, "regex": "boom"}, "boom")
        _serves_after(engine)
