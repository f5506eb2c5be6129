"""Retraction on the decode server: admission keeps at most RESERVED_DECODE_TOKENS output slots
per request, so long outputs on a small KV pool run it dry; the newest running requests go back
to wait and are re-prefilled locally (their prompt and outputs so far) on the decode server.
Greedy outputs still equal the colocated run's, and both sides' pools come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pd_harness import POOL, Spec, check_groups, merged, run_colocated, run_pd
from test_pd_protocol import assert_same

from dpattn.disaggregation.decode import RESERVED_DECODE_TOKENS
from dpattn.disaggregation.states import KVPoll
from dpattn.distributed.parallel_state import Layout, ParallelState

NEW_TOKENS = 100
# Holds any one request whole (prompt + outputs: no abort as too big) and admits two at once,
# but not both whole: two running requests must run it dry.
DECODE_POOL = 160


def long_outputs() -> tuple[Spec, ...]:
    prompts = [
        tuple(range(3, 15)),
        tuple(range(40, 50)),
        tuple(range(3, 11)) + (77, 78, 79),  # shares a prefix with the first (prefix cache)
        tuple(range(200, 216)),
    ]
    return tuple(
        Spec(f"long-{i}", p, NEW_TOKENS, room=1000 + i, arrival=i) for i, p in enumerate(prompts)
    )


@pytest.mark.parametrize("radix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_decode_side_retraction_matches_colocated(
    tiny_models: dict[str, Path], radix: bool
) -> None:
    model = tiny_models["llama"]
    specs = long_outputs()
    assert NEW_TOKENS > RESERVED_DECODE_TOKENS  # admission cannot reserve the whole output
    longest = max(len(s.prompt) for s in specs) + NEW_TOKENS
    assert longest <= DECODE_POOL < 2 * longest <= POOL  # the colocated run never retracts
    p_runs, d_runs = run_pd(
        model,
        (1, 1),
        (1, 1),
        specs,
        decode_kw=dict(kv_pool_tokens=DECODE_POOL, disable_radix_cache=not radix),
    )
    assert sum(r.retractions for r in d_runs) > 0, "the decode side never retracted"
    assert not any(r.failures for r in d_runs), [r.failures for r in d_runs]
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(1, 1))  # KV slots and rows back (prefix cache flushed first)
    assert_same(merged(d_runs), run_colocated(model, specs), specs)


LATE = 2002  # the room whose KV the decode side sees late
LATE_POOL = 130
HOLD_POLLS = 100  # polls the late request's KV stays "in transfer" once alone there


class LateRoom:
    """The real zmq transfer, but room LATE reports Transferring for HOLD_POLLS more polls: a
    slow prefill server, whose request holds its reserved prompt slots all that time."""

    def __init__(self, ps: ParallelState, inner: Any) -> None:
        self.inner = inner
        self.polls = 0

    def poll(self, rooms: list[int]) -> list[KVPoll]:
        out = self.inner.poll(rooms)
        if LATE in rooms:
            # Counted from when it is the only room left: one poll per step of the long decode.
            self.polls += rooms == [LATE]
            if self.polls <= HOLD_POLLS:
                out[rooms.index(LATE)] = KVPoll.Transferring
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_running_request_is_not_aborted_while_another_kv_is_in_transfer(
    tiny_models: dict[str, Path],
) -> None:
    """Admission keeps only RESERVED_DECODE_TOKENS of the long request's outputs, so the late
    request's prompt slots are taken while the long one still needs them. The long one runs
    dry alone while that KV is in transfer: it must wait (retract), not fail, since the late
    request's slots come back once it finishes."""
    model = tiny_models["llama"]
    specs = (
        Spec("long", tuple(range(3, 15)), NEW_TOKENS, room=2001),
        Spec("late", tuple(range(100, 140)), 4, room=LATE, arrival=1),
    )
    assert 12 + NEW_TOKENS <= LATE_POOL < 12 + NEW_TOKENS + 40  # fits alone, not beside late
    p_runs, d_runs = run_pd(
        model,
        (1, 1),
        (1, 1),
        specs,
        decode_kw=dict(kv_pool_tokens=LATE_POOL, disable_radix_cache=True),
        wrap_decode=LateRoom,
    )
    assert not any(r.failures for r in d_runs), [r.failures for r in d_runs]
    assert sum(r.retractions for r in d_runs) > 0, "the decode side never retracted"
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(1, 1))
    assert_same(merged(d_runs), run_colocated(model, specs), specs)
