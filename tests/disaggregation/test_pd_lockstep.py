"""The decode side's lock-step: transfer states agreed over attention-TP before any rank moves
a request, and the PREBUILT step that joins other groups' forwards with an inner idle batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pd_harness import Spec, check_groups, merged, run_colocated, run_pd, workload
from test_pd_protocol import assert_same

from dpattn.disaggregation.states import KVPoll
from dpattn.distributed.parallel_state import Layout, ParallelState

HOLD = 6  # polls attention-TP rank 1 keeps reporting Transferring after its KV is complete


class HoldBack:
    """The real zmq transfer, but attention-TP rank 1 reports a finished room as still
    Transferring for HOLD more polls: the ranks of the group disagree for a while."""

    def __init__(self, ps: ParallelState, inner: Any) -> None:
        self.ps, self.inner = ps, inner
        self.seen: dict[int, int] = {}
        self.last: dict[int, int] = {}  # room -> the state this rank reported last poll

    def poll(self, rooms: list[int]) -> list[KVPoll]:
        out = []
        for room, state in zip(rooms, self.inner.poll(rooms)):
            if self.ps.attn_tp_rank == 1 and state is KVPoll.Success:
                self.seen[room] = self.seen.get(room, 0) + 1
                if self.seen[room] <= HOLD:
                    state = KVPoll.Transferring
            out.append(state)
        self.last = {room: int(s) for room, s in zip(rooms, out)}
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_nobody_moves_a_request_until_all_ranks_agree(tiny_models: dict[str, Path]) -> None:
    model = tiny_models["llama"]
    specs = workload(seed=3, n=4)
    p_runs, d_runs = run_pd(model, (1, 1), (2, 1), specs, wrap_decode=HoldBack)
    check_groups(d_runs, Layout(2, 1))  # identical queues on both ranks after every step
    rid_of = {s.room: s.rid for s in specs}
    r0, r1 = d_runs
    disagreed = 0
    for step, (s0, s1) in enumerate(zip(r0.local_states, r1.local_states)):
        for room, state in s0.items():
            if state == KVPoll.Success and s1.get(room) != KVPoll.Success:
                disagreed += 1
                transfer_queue = r0.queues[step][3]
                assert rid_of[room] in transfer_queue, f"step {step}: moved before rank 1 agreed"
    assert disagreed >= len(specs), "the ranks never disagreed: the test shows nothing"
    assert_same(merged(d_runs), run_colocated(model, specs), specs)


def test_prebuilt_joins_other_groups_forward_with_an_idle_batch(
    tiny_models: dict[str, Path],
) -> None:
    """Decode (4, 4): group 0 decodes a long request while group 1's requests arrive, groups 2
    and 3 stay idle. Group 1's PREBUILT steps run the inner idle batch (never a forward of their
    own) when group 0 runs a forward, and nothing when no group has tokens; the idle groups run
    idle batches alongside; --debug-lockstep checks every collective."""
    model = tiny_models["llama"]
    long = Spec("long", (5, 6, 7, 8), 120, room=1000, arrival=0, decode_group=0)
    late = [  # arrive at the decode server once "long" runs there
        Spec(f"late{i}", tuple(range(10 + i, 20 + i)), 3, room=2000 + i, arrival=1 + 2 * i,
             decode_group=1, after="long")
        for i in range(3)
    ]  # fmt: skip
    specs = (long, *late)
    p_runs, d_runs = run_pd(model, (1, 1), (4, 4), specs, decode_kw={"debug_lockstep": True})
    check_groups(d_runs, Layout(4, 4))
    group1 = d_runs[1]
    assert group1.prebuilt_steps, "no PREBUILT step ran"
    for step in group1.prebuilt_steps:
        gnt = step.global_num_tokens
        assert gnt[1] == 0, "a PREBUILT batch counted tokens in the MLP sync"
        if gnt[0] > 0:
            assert (step.mode, step.idle) == ("idle", True), (
                f"PREBUILT step ran {step.mode} alongside a forward"
            )
        else:
            assert step.mode == "none", "a forward ran with no tokens anywhere"
    assert any(s.global_num_tokens[0] > 0 for s in group1.prebuilt_steps), "no overlap"
    for idle_group in d_runs[2:]:
        assert not idle_group.outputs and not idle_group.prebuilt_steps
    assert_same(merged(d_runs), run_colocated(model, specs), specs)
