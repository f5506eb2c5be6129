"""Constrained decoding with pipeline stages (--pp-size 2): every stage admits a request with a
grammar in the same micro-batch (statuses agreed over attn_tp and the lane), only the last stage
masks and samples, and its stop decisions (the grammar's end) travel with the tokens, so outputs
parse and equal one stage's."""

from __future__ import annotations

import pytest
from grammar_engines import GRAMMARS, PROMPTS, check_done, plain_params, thread_engine

from dpattn.entrypoints.engine import Engine

pytestmark = pytest.mark.timeout(180)


def _run(engine: Engine) -> list[dict]:
    items = [(kind, PROMPTS[s % 2], s) for kind in GRAMMARS for s in range(2)]
    params = [
        {"max_new_tokens": 120, "temperature": 1.0, "seed": s, "ignore_eos": s % 2 == 1}
        | {kind: GRAMMARS[kind]}
        for kind, _, s in items
    ]
    outs = engine.generate(
        prompt=[p for _, p, _ in items] + PROMPTS[:1],
        sampling_params=params + [plain_params()],
    )
    return [(kind, o) for (kind, _, _), o in zip(items, outs)] + [("plain", outs[-1])]


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2)])
def test_constrained_outputs_at_pp2_equal_one_stage(model: str, eos: int, tp: int, dp: int) -> None:
    with thread_engine(model, tp, dp) as engine:
        ref = _run(engine)
    with thread_engine(model, tp, dp, pp_size=2, chunked_prefill_size=8) as engine:
        got = _run(engine)
        stats = [s for _, s in engine.step_stats]
        assert max(s.constrained for s in stats) > 0  # stage 0's stats: the results it applied
    for (kind, out), (_, want) in zip(got, ref):
        if kind != "plain":
            check_done(out, kind, eos)
        assert out["output_ids"] == want["output_ids"], kind
