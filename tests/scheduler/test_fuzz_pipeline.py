"""Protocol fuzzing with pipeline stages (issue 27): random layouts, workloads, per-stage timing
and aborts through the real scheduler as P stages (pipeline_driver.py), checking that

- every stage of a lane holds the same scheduler state after every micro-batch,
- every rank counts the same output messages sent and skipped,
- requests finish, the KV pool is whole again once the cache is flushed (the driver's ranks
  leave with the cache invariants checked by the per-step digest), and
- the tokens of the requests that were not aborted equal those of one stage (--pp-size 1) and
  of a single rank: outputs depend on neither the pipeline nor the layout.

The default run is small (DPATTN_PP_FUZZ_EXAMPLES raises it; the whole suite's random fuzzing
is opt-in through DPATTN_FUZZ_SECONDS, see test_fuzz_protocol.py).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_driver import Job, finish_by_rid, run_pipeline, tokens_by_rid

from dpattn.distributed.layout import Layout
from dpattn.models.tiny import make_tiny_model

LAYOUTS = [(1, 1, 2), (1, 1, 3), (2, 2, 2), (2, 1, 2)]
EXAMPLES = int(os.environ.get("DPATTN_PP_FUZZ_EXAMPLES", "12"))


@functools.cache
def _model() -> str:
    root = tempfile.mkdtemp(prefix="dpattn-ppfuzz-")
    atexit.register(shutil.rmtree, root, True)  # hypothesis tests cannot take tmp_path fixtures
    out = Path(root) / "m"
    return str(make_tiny_model("qwen3_moe", out, seed=3, num_hidden_layers=4, mlp_only_layers=[0]))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    t, d, p = draw(st.sampled_from(LAYOUTS))
    shared = [(), tuple(range(7, 7 + draw(st.integers(1, 10)))), (400, 401, 402)]
    jobs = []
    for i in range(draw(st.integers(1, 6))):
        prompt = draw(st.sampled_from(shared)) + tuple(
            draw(st.lists(st.integers(3, 500), min_size=1, max_size=12))
        )
        jobs.append(
            Job(
                f"r{i}",
                list(prompt[:12]),  # + 6 new tokens: fits the smallest pool (context 20)
                max_new=draw(st.integers(1, 6)),
                arrival=draw(st.integers(0, 6)),
                group=draw(st.integers(0, d - 1)),
                abort_at=draw(st.one_of(st.none(), st.integers(0, 12))),
                return_logprob=draw(st.booleans()),
            )
        )
    return dict(
        layout=(t, d, p),
        jobs=jobs,
        chunk=draw(st.sampled_from([3, 8, 64])),
        kv_tokens=draw(st.sampled_from([20, 40, 256])),  # 20: retraction with a few requests
        radix=draw(st.booleans()),
        jitter_s=draw(st.sampled_from([0.0, 0.002])),
        seed=draw(st.integers(0, 1000)),
    )


@pytest.mark.timeout(600)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(case=cases())
def test_pipeline_protocol_invariants(case: dict) -> None:
    t, d, p = case["layout"]
    layout = Layout(t, d, p)
    common = dict(
        kv_tokens=case["kv_tokens"],
        chunk=case["chunk"],
        sched_options={"disable_radix_cache": not case["radix"], "max_running_requests": 4},
    )
    logs = run_pipeline(
        _model(), case["jobs"], layout, jitter_s=case["jitter_s"], seed=case["seed"], **common
    )
    for r in range(layout.tp_size):
        lane = [logs[g] for g in layout.lane_ranks(r)]
        for s, log in enumerate(lane[1:], 1):
            assert log.digests == lane[0].digests, f"lane {r}: stage {s} diverged from stage 0"
    for r in range(layout.tp_size):  # every stage of a lane counts the same micro-batches
        lane = {
            (logs[g].counters["outputs_sent"], logs[g].counters["outputs_skipped"])
            for g in layout.lane_ranks(r)
        }
        assert len(lane) == 1, f"lane {r}: {lane}"
    # Outputs: stage 0's ranks; the unaborted requests' tokens equal one rank's, one stage's.
    ref_jobs = [Job(j.rid, j.prompt, j.max_new, j.arrival) for j in case["jobs"]]
    ref = run_pipeline(_model(), ref_jobs, Layout(1, 1, 1), kv_tokens=256, chunk=64)
    want = tokens_by_rid(ref[0])
    aborted = {j.rid for j in case["jobs"] if j.abort_at is not None}
    for g in layout.stage_ranks(0):
        got, finish = tokens_by_rid(logs[g]), finish_by_rid(logs[g])
        mine = [j for j in case["jobs"] if j.group == layout.dp_rank(g)]
        for j in mine:
            assert finish.get(j.rid) in ("length", "abort"), (j.rid, finish)
            if j.rid not in aborted:
                assert got.get(j.rid) == want[j.rid], f"rank {g} {j.rid}"
