"""The scheduler as pipeline stages (issue 27): outputs equal --pp-size 1, every stage of a lane
holds the same scheduler state after every micro-batch, and middle prefill chunks send no output
message (pipeline_driver.py runs the real scheduler and model on rank threads)."""

from __future__ import annotations

import dataclasses

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


def _spread(jobs: list[Job], groups: int) -> list[Job]:
    return [dataclasses.replace(j, group=i % groups) for i, j in enumerate(jobs)]


@pytest.mark.parametrize(
    "tp,dp,options",
    [(2, 2, {}), (2, 1, {"moe_dense_tp_size": 1}), (2, 2, {"ep": True})],
    ids=["dp2", "scattered", "ep"],
)
def test_pipeline_with_dp_attention_stages(moe4: str, tp: int, dp: int, options: dict) -> None:
    """Each stage a full (T, D) layout with its own MLP sync; idle DP groups travel the pipeline
    as zero-row micro-batches."""
    jobs = _spread(_jobs(), dp)[:3] + [Job("late", [4, 5, 6], max_new=3, arrival=9, group=0)]
    ref = run_pipeline(moe4, jobs, Layout(tp, dp, 1), chunk=8, runner_options=options)
    layout = Layout(tp, dp, 2)
    logs = run_pipeline(moe4, jobs, layout, chunk=8, runner_options=options)
    _check_lanes(logs, layout)
    for g in layout.stage_ranks(0):
        assert tokens_by_rid(logs[g]) == tokens_by_rid(ref[g]), f"rank {g}"


def test_retraction_and_abort_in_flight(moe4: str) -> None:
    """A pool too small for every request: retraction replays identically on every stage, and
    an abort that lands while a request's token is on its way is applied the same way too."""
    jobs = [Job(f"r{i}", [7 + i] * 10, max_new=12, arrival=i) for i in range(4)]
    jobs.append(Job("gone", [9, 9, 9, 9], max_new=20, arrival=0, abort_at=6))
    ref = run_pipeline(moe4, jobs, Layout(1, 1, 1), kv_tokens=48, chunk=8)
    logs = run_pipeline(moe4, jobs, Layout(1, 1, 2), kv_tokens=48, chunk=8)
    _check_lanes(logs, Layout(1, 1, 2))
    assert logs[0].retractions > 0 and logs[1].retractions == logs[0].retractions
    got, want = tokens_by_rid(logs[0]), tokens_by_rid(ref[0])
    assert {k: v for k, v in got.items() if k != "gone"} == {
        k: v for k, v in want.items() if k != "gone"
    }
    assert finish_by_rid(logs[0])["gone"] == "abort"


def test_skip_rule_that_differs_between_stages_is_named(moe4: str) -> None:
    """If one stage sent the output message of a middle chunk that the others skip, stage 0
    reads the next message and names the mismatch (no hang, no wrong token)."""

    def hook(ps, sched, stage) -> None:
        if stage is not None and stage.last:
            stage.output_rule = lambda batch: batch is not None

    with pytest.raises(Exception, match=r"stage 0 rank 0: recv from stage 1 rank 1: expected"):
        run_pipeline(moe4, [Job("long", LONG, max_new=2)], Layout(1, 1, 2), chunk=8, rank_hook=hook)


def test_lockstep_names_a_stage_whose_state_diverged(moe4: str) -> None:
    """--debug-lockstep: the hidden rows' tag carries the sender's scheduler state."""

    def hook(ps, sched, stage) -> None:
        if ps.pp_rank == 1:
            sched.num_retractions = 1  # a state no other stage has

    with pytest.raises(Exception, match=r"stage 1 rank 1: recv from stage 0 rank 0: expected"):
        run_pipeline(
            moe4,
            [Job("a", [5, 6, 7], max_new=2)],
            Layout(1, 1, 2),
            sched_options={"debug_lockstep": True},
            rank_hook=hook,
        )


def test_requests_that_arrive_together_spread_over_micro_batches(moe4: str) -> None:
    """Eight prompts at once at --pp-size 2: each micro-batch admits its share (four), so both
    slots prefill and then decode four each, instead of one slot holding all and the other
    leaving every stage idle half the time."""
    jobs = [Job(f"r{i}", [5 + i, 6, 7], max_new=4) for i in range(8)]
    logs = run_pipeline(moe4, jobs, Layout(1, 1, 2), chunk=64)
    busy = [n for n in logs[0].sizes if n]
    assert busy[:4] == [4, 4, 4, 4], logs[0].sizes


def test_grammar_failure_is_agreed_by_every_stage(moe4: str) -> None:
    """A grammar that cannot compile (this driver's ranks have no tokenizer) fails with a 400 in
    the same micro-batch on every stage (statuses agreed over the lane); the other requests are
    unaffected. Constrained outputs at --pp-size 2: test_grammar_pipeline.py."""
    jobs = [Job("g", [5, 6, 7], regex="[ab]+"), Job("a", [5, 6, 7], max_new=3)]
    logs = run_pipeline(moe4, jobs, Layout(1, 1, 2))
    _check_lanes(logs, Layout(1, 1, 2))
    for log in logs:
        (refused,) = [o for o in log.outputs if o.rid == "g"]
        assert refused.finish_reason == "abort" and refused.error_status == 400
        assert "tokenizer" in refused.error
    assert len(tokens_by_rid(logs[0])["a"]) == 3
