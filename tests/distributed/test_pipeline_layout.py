"""Pipeline rank numbering (stage-major, every stage a full T/D layout) and the layer split
between stages: pure arithmetic, no ranks started."""

from __future__ import annotations

import pytest

from dpattn.distributed.layout import Layout, layer_partition

LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 1), (2, 2, 2), (2, 4, 2), (3, 4, 1), (4, 2, 2)]


@pytest.mark.parametrize("pp,tp,dp", LAYOUTS)
def test_stage_major_numbering(pp: int, tp: int, dp: int) -> None:
    layout, flat = Layout(tp, dp, pp), Layout(tp, dp)
    assert layout.world_size == pp * tp and layout.attn_tp_size == tp // dp
    # the stages' ranks partition the world, in order
    assert [g for s in range(pp) for g in layout.stage_ranks(s)] == list(range(pp * tp))
    for g in range(layout.world_size):
        s, r = layout.stage(g), layout.rank_in_stage(g)
        assert g == s * tp + r == layout.global_rank(s, r)
        # inside its stage a rank is where it would be at pp_size 1
        assert layout.dp_rank(g) == layout.dp_rank(r) == flat.dp_rank(r)
        assert layout.attn_tp_rank(g) == flat.attn_tp_rank(r)
        d = layout.dp_rank(g)
        assert g in layout.attn_tp_ranks(d, s)
        assert [x - s * tp for x in layout.attn_tp_ranks(d, s)] == flat.attn_tp_ranks(d)
        assert set(layout.attn_tp_ranks(d, s)) <= set(layout.stage_ranks(s))
        # its lane: the same (dp, attn_tp) position in every stage; the ring wraps
        lane = layout.lane_ranks(g)
        assert lane == [t * tp + r for t in range(pp)] and lane[s] == g
        assert layout.next_stage_rank(g) == lane[(s + 1) % pp]
        assert layout.prev_stage_rank(g) == lane[(s - 1) % pp]
        assert {layout.dp_rank(x) for x in lane} == {d}


def test_pp_size_1_is_the_layout_of_before() -> None:
    layout = Layout(4, 2)
    assert layout == Layout(4, 2, 1) and layout.world_size == 4
    assert [layout.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.attn_tp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert layout.attn_tp_ranks(1) == [2, 3] and layout.stage_ranks(0) == [0, 1, 2, 3]
    assert layout.next_stage_rank(3) == layout.prev_stage_rank(3) == 3  # a ring of one


def test_layout_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="pp_size 0 must be at least 1"):
        Layout(2, 1, 0)
    with pytest.raises(ValueError, match="multiple of dp_size"):
        Layout(3, 2, 2)
    layout = Layout(2, 1, 2)
    with pytest.raises(ValueError, match="rank 4 is outside a world of 4 ranks"):
        layout.stage(4)
    with pytest.raises(ValueError, match="stage 2 is outside a pipeline of 2 stages"):
        layout.stage_ranks(2)
    with pytest.raises(ValueError, match="rank 2 is outside a stage of 2 ranks"):
        layout.global_rank(0, 2)


@pytest.mark.parametrize(
    "layers,pp,counts",
    [
        (4, 1, [4]),
        (4, 2, [2, 2]),
        (3, 2, [2, 1]),  # the case: the extra layer goes before the last stage
        (5, 2, [3, 2]),
        (5, 4, [1, 1, 2, 1]),
        (7, 4, [2, 2, 2, 1]),
        (8, 4, [2, 2, 2, 2]),
        (4, 4, [1, 1, 1, 1]),
        (10, 3, [3, 4, 3]),
    ],
)
def test_even_layer_partition(layers: int, pp: int, counts: list[int]) -> None:
    bounds = layer_partition(layers, pp)
    assert [e - s for s, e in bounds] == counts
    assert bounds[0][0] == 0 and bounds[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
    assert max(counts) - min(counts) <= 1


def test_explicit_layer_partition() -> None:
    assert layer_partition(6, 3, [1, 3, 2]) == [(0, 1), (1, 4), (4, 6)]
    assert layer_partition(3, 1, [3]) == [(0, 3)]


@pytest.mark.parametrize(
    "layers,pp,explicit,message",
    [
        (3, 4, None, "--pp-size 4 is larger than the model's 3 decoder layers"),
        (3, 4, [1, 1, 1, 0], "--pp-size 4 is larger than the model's 3 decoder layers"),
        (4, 2, [1, 2], "--pp-layer-partition 1,2 sums to 3, but the model has 4 decoder layers"),
        (4, 2, [1, 1, 2], "--pp-layer-partition 1,1,2 has 3 entries; --pp-size 2 needs 2"),
        (4, 2, [4, 0], "--pp-layer-partition 4,0: every stage needs at least one layer"),
        (4, 2, [5, -1], "--pp-layer-partition 5,-1: every stage needs at least one layer"),
        (4, 0, None, "--pp-size must be at least 1, got 0"),
        (0, 1, None, "the model has 0 decoder layers"),
    ],
)
def test_layer_partition_errors_are_one_line(
    layers: int, pp: int, explicit: list[int] | None, message: str
) -> None:
    with pytest.raises(ValueError) as e:
        layer_partition(layers, pp, explicit)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
