"""Launching a pipelined engine's ranks (issue 27): P * T ranks, each with its global rank and
its stage's groups, results in global rank order; a stage's model runner takes its layers from
the layout, and every stage of a lane sizes the same KV pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import dpattn.executor.model_runner as model_runner
from dpattn.config import RunnerConfig
from dpattn.distributed.layout import Layout
from dpattn.distributed.parallel_state import ParallelState
from dpattn.executor.model_runner import ModelRunner
from dpattn.kvcache.budget import KVBudget
from dpattn.models.tiny import make_tiny_model
from dpattn.runtime.launch import NodeSpec, run_ranks


def whoami(ps: ParallelState) -> dict[str, Any]:
    """What a rank knows of its place, and one collective on each of its groups."""
    stage_sum = ps.world.all_reduce(torch.tensor([float(ps.global_rank)]))
    assert ps.pp_group is not None
    lane = ps.pp_group.all_gather(torch.tensor([[ps.global_rank]]))
    return {
        "global": ps.global_rank,
        "stage": ps.pp_rank,
        "rank": ps.rank,
        "stage_sum": float(stage_sum.item()),
        "lane": lane.flatten().tolist(),
    }


def expected(layout: Layout) -> list[dict[str, Any]]:
    out = []
    for g in range(layout.world_size):
        s = layout.stage(g)
        out.append(
            {
                "global": g,
                "stage": s,
                "rank": layout.rank_in_stage(g),
                "stage_sum": float(sum(layout.stage_ranks(s))),
                "lane": layout.lane_ranks(g),
            }
        )
    return out


@pytest.mark.parametrize("tp,dp,pp", [(2, 1, 2), (2, 2, 3), (1, 1, 4)])
def test_thread_ranks_in_global_order(tp: int, dp: int, pp: int) -> None:
    layout = Layout(tp, dp, pp)
    assert run_ranks(whoami, layout, "thread") == expected(layout)


@pytest.mark.gloo
@pytest.mark.world4
def test_gloo_ranks_in_global_order() -> None:
    layout = Layout(2, 2, 2)
    assert run_ranks(whoami, layout, "gloo") == expected(layout)


def test_nodes_split_the_world_stage_major() -> None:
    layout = Layout(2, 1, 3)
    per_node = [NodeSpec(3, n).local_ranks(layout) for n in range(3)]
    assert per_node == [[0, 1], [2, 3], [4, 5]]  # --nnodes P: one stage per host
    assert NodeSpec(2, 1).local_ranks(Layout(4, 2, 2)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="6 ranks cannot be spread over 4 nodes"):
        NodeSpec(4, 0).local_ranks(layout)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        "llama", tmp_path_factory.mktemp("pp-launch") / "llama", num_hidden_layers=4
    )


def test_runner_stage_and_pool_from_the_layout(
    four_layers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages [0, 3) and [3, 4): a token costs stage 0 three times the bytes, so memory alone
    would give it a third of the slots; the lane takes the smallest, on every stage."""

    def by_bytes(*args: Any) -> KVBudget:
        per_token = args[2]
        return KVBudget(300_000 // per_token, per_token, "test: bytes")

    monkeypatch.setattr(model_runner, "kv_budget", by_bytes)

    def rank(ps: ParallelState) -> tuple[int, int, int, int, int]:
        r = ModelRunner(RunnerConfig(str(four_layers), pp_layer_partition=[3, 1]), ps)
        own = 300_000 // r.kv_budget.bytes_per_token
        return r.stage.start, r.stage.end, r.kv_pool.size, own, r.context_length

    out = run_ranks(rank, Layout(2, 2, 2), "thread")
    assert [o[:2] for o in out] == [(0, 3)] * 2 + [(3, 4)] * 2
    pools = {o[2] for o in out}
    assert len(pools) == 1 and pools == {min(o[3] for o in out)}
    assert out[0][3] < out[-1][3]  # the stages' own sizes did differ
    assert len({o[4] for o in out}) == 1  # and so one context length
