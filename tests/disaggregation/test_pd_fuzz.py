"""Hypothesis: random per-rank transfer completion times on the decode side (the real zmq
transfer, each rank holding each room back a random number of polls), random arrivals and
aborts. The ranks of a group never diverge (the thread backend fails a mismatched collective;
queues compared after every step), every request ends, both sides' pools come back, and the
requests that were not aborted equal the colocated run."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pd_harness import check_groups, merged, run_colocated, run_pd, workload
from test_pd_protocol import assert_same

from dpattn.disaggregation.states import KVPoll
from dpattn.distributed.parallel_state import Layout, ParallelState


class RandomHold:
    """Each rank reports a finished room as Transferring for a random number of polls of its
    own (seeded per rank and room): completion times differ across the ranks of a group."""

    def __init__(self, seed: int, ps: ParallelState, inner: Any) -> None:
        self.seed, self.ps, self.inner = seed, ps, inner
        self.held: dict[int, int] = {}

    def poll(self, rooms: list[int]) -> list[KVPoll]:
        out = []
        for room, state in zip(rooms, self.inner.poll(rooms)):
            if state is KVPoll.Success:
                if room not in self.held:
                    self.held[room] = random.Random(
                        hash((self.seed, self.ps.rank, room))
                    ).randrange(8)
                if self.held[room] > 0:
                    self.held[room] -= 1
                    state = KVPoll.Transferring
            out.append(state)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# Two examples by default (each runs two worlds), one for the MLA model;
# DPATTN_PD_FUZZ_EXAMPLES=N for more (N for each).
EXAMPLES = int(os.environ.get("DPATTN_PD_FUZZ_EXAMPLES", "2"))
MLA_EXAMPLES = int(os.environ.get("DPATTN_PD_FUZZ_EXAMPLES", "1"))

DRAWS = dict(
    seed=st.integers(0, 2**16),
    decode=st.sampled_from([(2, 1), (2, 2)]),
    aborts=st.lists(st.integers(0, 6), min_size=5, max_size=5),
)


def check_random_transfer_times(
    model: Path, seed: int, decode: tuple[int, int], aborts: list[int]
) -> None:
    specs = workload(seed=seed, n=5)
    # a 0 draws no abort; otherwise the decode side aborts that many steps after arrival
    specs = tuple(replace(s, abort_decode_at=a - 1 if a else None) for s, a in zip(specs, aborts))
    p_runs, d_runs = run_pd(
        model,
        (1, 1),
        decode,
        specs,
        prefill_kw=dict(disaggregation_bootstrap_timeout_s=6.0),
        wrap_decode=lambda ps, inner: RandomHold(seed, ps, inner),
    )
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(*decode))
    got = merged(d_runs)
    assert all(r.finish_reason is not None for r in got.values())
    kept = tuple(s for s in specs if got[s.rid].finish_reason != "abort")
    reasons = {rid: why for r in d_runs for rid, why in r.failures.items()}
    for s in specs:
        if s not in kept:  # only the aborts the test injected, never a failure of its own
            assert s.abort_decode_at is not None, f"{s.rid} failed: {reasons.get(s.rid)}"
    assert_same(got, run_colocated(model, kept), kept)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(**DRAWS)
def test_random_transfer_times_keep_lockstep(
    tiny_models: dict[str, Path], seed: int, decode: tuple[int, int], aborts: list[int]
) -> None:
    check_random_transfer_times(tiny_models["llama"], seed, decode, aborts)


@settings(max_examples=MLA_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(**DRAWS)
def test_random_transfer_times_keep_lockstep_mla(
    mla_models: dict[str, Path], seed: int, decode: tuple[int, int], aborts: list[int]
) -> None:
    """The same on an MLA model: the latent rows of a (2, 1) decode group reach both ranks."""
    check_random_transfer_times(mla_models["deepseek_v3"], seed, decode, aborts)
