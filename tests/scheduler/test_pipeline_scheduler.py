"""The scheduler as pipeline stages (issue 27): outputs equal --pp-size 1, every stage of a lane
holds the same scheduler state after every micro-batch, and middle prefill chunks send no output
message (pipeline_driver.py runs the real scheduler and model on rank threads)."""

from __future__ import annotations

import pytest
from pipeline_driver import Job, finish_by_rid, run_pipeline, tokens_by_rid

from dpattn.distributed.layout import Layout
from dpattn.models.tiny import make_tiny_model

LONG = list(range(3, 3 + 40))  # 40 tokens: 5 chunks of 8


def _jobs() -> list[Job]:
    return [
        Job("a", [5, 9, 200, 31, 77, 8], max_new=8),
        Job("b", [42, 7, 300], max_new=5, arrival=1),
        Job("long", LONG, max_new=4, arrival=2),
        Job("c", [11, 12, 13, 14], max_new=6, arrival=3, return_logprob=True, top_logprobs_num=2),
        Job("n", [8, 8, 9], max_new=3, arrival=4, n=2),
    ]


def _check_lanes(logs: list, layout: Layout) -> None:
    """Every stage of a lane: the same state digest after every micro-batch."""
    for r in range(layout.tp_size):
        lane = [logs[g] for g in layout.lane_ranks(r)]
        for s, log in enumerate(lane[1:], 1):
            assert log.digests == lane[0].digests, f"lane {r}: stage {s} diverged from stage 0"


@pytest.fixture(scope="module")
def moe4(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 layers (layer 0 dense, then MoE): enough for 4 stages."""
    out = tmp_path_factory.mktemp("pp") / "moe4"
    return str(make_tiny_model("qwen3_moe", out, seed=1, num_hidden_layers=4, mlp_only_layers=[0]))


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_equals_one_stage(moe4: str, pp: int) -> None:
    model = moe4
    ref = run_pipeline(model, _jobs(), Layout(1, 1, 1), chunk=8)
    logs = run_pipeline(model, _jobs(), Layout(1, 1, pp), chunk=8)
    _check_lanes(logs, Layout(1, 1, pp))
    assert tokens_by_rid(logs[0]) == tokens_by_rid(ref[0])
    assert finish_by_rid(logs[0]) == finish_by_rid(ref[0])
    # logprobs travel with the tokens around the ring
    got = [x for o in logs[0].outputs if o.rid == "c" for x in o.new_logprobs]
    want = [x for o in ref[0].outputs if o.rid == "c" for x in o.new_logprobs]
    assert got == pytest.approx(want, abs=1e-5)
    c = logs[0].counters
    assert c["outputs_skipped"] >= 4, c  # the long prompt's 4 middle chunks at least
    counts = {(log.counters["outputs_sent"], log.counters["outputs_skipped"]) for log in logs}
    assert len(counts) == 1, f"stages counted differently: {counts}"
