"""CUDA graph decisions on CPU: captured sizes, the local vote, the vote over ranks (min, through
the MLP sync on the thread backend) and the MAX_LEN padding to the captured size. No graph is
captured here: the replay itself is checked on a GPU (tests/gpu)."""

from __future__ import annotations

import pytest

from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.graph_plan import (
    capture_batch_sizes,
    capture_kv_buckets,
    graph_batch_size,
    graph_unavailable_reason,
    local_vote,
)
from dpattn.executor.sampling_params import SamplingParams
from dpattn.layers.dp_attention import GatherPlan, PaddingMode
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.mlp_sync import prepare_mlp_sync_batch
from dpattn.scheduler.schedule_batch import Req, ScheduleBatch

DECODE, EXTEND, IDLE = ForwardMode.DECODE, ForwardMode.EXTEND, ForwardMode.IDLE


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(32, 1, 32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_batch_sizes(20, 1, 64) == [1, 2, 4, 8, 16, 20]
    assert capture_batch_sizes(32, 2, 32) == [2, 4, 8, 16, 24, 32]  # multiples of A
    assert capture_batch_sizes(32, 4, 6) == [4, 8]  # capped: a group never decodes more
    assert capture_batch_sizes(32, 1, 3) == [1, 2, 3]


def test_capture_kv_buckets() -> None:
    assert capture_kv_buckets(4096, 32768) == [256, 512, 1024, 2048, 4096]
    assert capture_kv_buckets(4096, 1000) == [256, 512, 1000]  # the context caps them
    assert capture_kv_buckets(100, 1000) == [100]


SIZES, KV = [1, 2, 4, 8, 16], [256, 512]


@pytest.mark.parametrize(
    "mode,n,longest,vote",
    [
        (DECODE, 3, 40, True),
        (DECODE, 16, 512, True),
        (DECODE, 17, 40, False),  # more tokens than the largest graph
        (DECODE, 3, 513, False),  # a sequence longer than the largest KV bucket
        (EXTEND, 3, 40, False),  # extends run eagerly
        (ForwardMode.MIXED, 3, 40, False),
        (IDLE, 0, 0, True),  # an idle rank pads a whole graph batch
        (ForwardMode.PREBUILT, 0, 0, True),
        (None, 0, 0, True),  # no batch at all: must not veto the others' replay
    ],
)
def test_local_vote(mode: ForwardMode | None, n: int, longest: int, vote: bool) -> None:
    assert local_vote(mode, n, longest, SIZES, KV) is vote
    assert local_vote(mode, n, longest, [], []) is False  # no graphs captured


@pytest.mark.parametrize(
    "gnt,size", [([3, 0], 4), ([1, 1], 1), ([16, 2], 16), ([0, 0], 1), ([5, 9, 2, 0], 16)]
)
def test_graph_batch_size_is_the_smallest_capture_that_holds_every_group(
    gnt: list[int], size: int
) -> None:
    assert graph_batch_size(gnt, SIZES) == size


def test_graph_batch_size_beyond_the_captures_is_an_error() -> None:
    with pytest.raises(ValueError, match="largest captured batch is 16"):
        graph_batch_size([17, 0], SIZES)


@pytest.mark.parametrize("a", [1, 2, 4])
def test_replay_plan_is_max_len_padded_to_the_captured_size(a: int) -> None:
    gnt = [3, 0, 5 if a < 4 else 4]
    bs = graph_batch_size(gnt, capture_batch_sizes(32, a, 32))
    plan = GatherPlan.build(gnt, a, graph=True, graph_bs=bs, override="sum_len")
    assert plan.mode is PaddingMode.MAX_LEN  # a replay ignores the override
    assert plan.lens == (bs,) * 3 and plan.starts == (0, bs, 2 * bs) and plan.total == 3 * bs
    assert bs % a == 0 and bs >= max(plan.padded)
    with pytest.raises(ValueError, match="cannot hold"):
        GatherPlan.build(gnt, a, graph=True, graph_bs=2 * a - 1 if a > 1 else 2)


def test_graph_unavailable_reason() -> None:
    assert graph_unavailable_reason("cuda", True, False, 4) is None  # NCCL ranks
    assert graph_unavailable_reason("cuda", False, False, 1) is None  # one rank: no collective
    assert "NCCL" in str(graph_unavailable_reason("cuda", False, False, 2))  # thread backend
    assert "--device cuda" in str(graph_unavailable_reason("cpu", False, False, 1))
    assert graph_unavailable_reason("cuda", True, True, 1) == "--disable-cuda-graph"
    assert "MAX_LEN" in str(graph_unavailable_reason("cuda", True, False, 4, "sum_len"))
    assert graph_unavailable_reason("cuda", True, False, 4, "max_len") is None


# --------------------------------------------------------------- the vote over ranks (MLP sync)


def _batch(kind: str) -> ScheduleBatch | None:
    if kind == "none":
        return None
    if kind == "idle":
        return ScheduleBatch.idle()
    if kind == "prebuilt":  # its requests' KV arrived; it runs no rows itself (inner idle)
        reqs = [Req("p", [5] * 900, SamplingParams(), seed=0, kv_len=899)]
        return ScheduleBatch(ForwardMode.PREBUILT, reqs=reqs)
    n = {"decode": 3, "big": 20, "extend": 5}[kind]
    mode = EXTEND if kind == "extend" else DECODE
    reqs = [
        Req(f"r{i}", [5] * 7, SamplingParams(), seed=0, kv_len=7, extend_len=1) for i in range(n)
    ]
    return ScheduleBatch(mode, reqs=reqs, input_ids=[5] * n, sample_mask=[True] * n)


def _vote(mode: ForwardMode | None, n: int, longest: int) -> bool:
    return local_vote(mode, n, longest, SIZES, KV)


@pytest.mark.parametrize(
    "kinds,replay,size",
    [
        (["decode", "decode"], True, 4),
        (["decode", "idle"], True, 4),
        (["decode", "none"], True, 4),  # the idle group gets an IDLE batch that replays too
        (["decode", "prebuilt"], True, 4),  # its inner idle batch replays with the others
        (["decode", "extend"], False, None),  # one group cannot: nobody replays
        (["decode", "big"], False, None),  # 20 tokens: larger than every graph
    ],
)
def test_vote_is_the_min_over_ranks(kinds: list[str], replay: bool, size: int | None) -> None:
    layout = Layout(4, 2)  # A = 2: both ranks of a group hold the same batch (and vote alike)

    def fn(ps: ParallelState) -> tuple[bool, bool, int | None, int]:
        batch, decision = prepare_mlp_sync_batch(ps, _batch(kinds[ps.dp_rank]), graph_vote=_vote)
        assert batch is not None
        run = batch.inner_idle_batch if batch.forward_mode is ForwardMode.PREBUILT else batch
        assert run is not None and run.can_run_graph == decision.can_run_graph  # rule 5
        gnt = decision.global_num_tokens
        bs = graph_batch_size(gnt, SIZES) if decision.can_run_graph else None
        plan = GatherPlan.build(gnt, ps.attn_tp_size, graph=decision.can_run_graph, graph_bs=bs)
        return decision.can_run_graph, decision.run_forward, bs, plan.total

    results = run_ranks(fn, layout, backend="thread", timeout_s=20)
    assert len(set(results)) == 1  # every rank takes the same decision
    can, run, bs, total = results[0]
    assert (can, run, bs) == (replay, True, size)
    if replay:
        assert total == layout.dp_size * size  # MAX_LEN, every slot the captured size


def test_without_a_runner_vote_the_batch_flag_decides() -> None:
    """Callers without a graph runner (verify, unit tests) keep the batch's own flag."""

    def fn(ps: ParallelState) -> bool:
        batch = _batch("decode")
        assert batch is not None
        batch.can_run_graph = ps.dp_rank == 0
        return prepare_mlp_sync_batch(ps, batch)[1].can_run_graph

    assert run_ranks(fn, Layout(2, 2), backend="thread", timeout_s=20) == [False, False]
