"""Engine end to end on the thread backend: full-length greedy outputs equal across layouts,
including attn_tp > 1 where requests are broadcast inside the group (no shared objects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpattn.entrypoints.engine import Engine

PROMPTS = [[5, 6, 7], [9, 10], [3, 4, 5, 6, 7, 8, 9]]


def _outputs(model: Path, tp: int, dp: int, **options: object) -> list[list[int]]:
    with Engine(str(model), tp, dp, backend="thread", **options) as engine:
        outs = engine.generate(
            input_ids=PROMPTS,
            sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        )
        assert engine.router.inflight == [0] * dp
    return [o["output_ids"] for o in outs]


@pytest.mark.parametrize("tp,dp", [(2, 1), (4, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("policy", ["round_robin", "shortest_queue", "minimum_tokens"])
def test_layouts_match_single_rank(
    tiny_models: dict[str, Path], tp: int, dp: int, policy: str
) -> None:
    ref = _outputs(tiny_models["llama"], 1, 1)
    assert all(len(ids) == 8 for ids in ref)
    assert _outputs(tiny_models["llama"], tp, dp, router_policy=policy) == ref
