"""Prefill/decode disaggregation over the real schedulers and the zmq transfer (rank threads):
greedy outputs equal the colocated run's across layouts, the ranks of a group hold identical
queues after every step, and both sides' KV pools and request rows come back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pd_harness import Spec, check_groups, merged, run_colocated, run_pd, workload

from dpattn.distributed.parallel_state import Layout

LOGPROB_TOL = 1e-4


def assert_same(got: dict, ref: dict, specs: tuple[Spec, ...]) -> None:
    for s in specs:
        g, r = got[s.rid], ref[s.rid]
        assert g.finish_reason == r.finish_reason, s.rid
        assert g.ids == r.ids, f"{s.rid}: tokens differ from the colocated run"
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=LOGPROB_TOL, rtol=0
        )


LAYOUTS = [
    ((1, 1), (1, 1)),
    ((2, 1), (2, 2)),  # attention-TP 2 -> 1: the decode ranks join the heads' slices
    ((2, 2), (2, 1)),  # attention-TP 1 -> 2: each decode rank takes one prefill rank's slice
    ((4, 1), (4, 2)),  # 4 -> 2 with 2 KV heads: prefill ranks hold copies, one copy is sent
    ((1, 1), (4, 1)),  # 1 -> 4: decode ranks hold copies of the 2 heads, each gets its own
]


@pytest.mark.parametrize("prefill,decode", LAYOUTS, ids=lambda x: f"{x[0]}x{x[1]}")
def test_outputs_equal_colocated(
    tiny_models: dict[str, Path], prefill: tuple[int, int], decode: tuple[int, int]
) -> None:
    model = tiny_models["llama"]
    specs = workload(seed=1, n=6)
    specs = (
        *specs,
        replace(specs[0], rid="one-token", max_new_tokens=1, room=12345),
        # seeded sampling: the decode side continues the generator the prefill side drew from
        replace(specs[1], rid="sampled", temperature=0.9, seed=4242, room=777, max_new_tokens=8),
    )
    assert any(len(s.prompt) > 8 for s in specs)  # chunked prefill on the prefill side
    p_runs, d_runs = run_pd(model, prefill, decode, specs)
    check_groups(p_runs, Layout(*prefill))
    check_groups(d_runs, Layout(*decode))
    assert_same(merged(d_runs), run_colocated(model, specs), specs)
    # The prefill server's own client gets the first token and the end.
    for s in specs:
        first = merged(p_runs)[s.rid]
        assert first.finish_reason == "length" and len(first.ids) == 1


# MLA (DeepSeek): the latent row moves whole; every decode rank of a group takes the same rows
# from prefill rank 0 of the request's group, whatever the attention-TP width on either side.
MLA_LAYOUTS = [
    ("deepseek_v3", (1, 1), (4, 4)),  # one prefill group feeds four decode groups
    ("deepseek_v2", (2, 2), (2, 1)),  # attention-TP 1 -> 2: both decode ranks take the rows
    ("deepseek_v3_noq", (2, 1), (2, 2)),  # attention-TP 2 -> 1: prefill rank 1 sends nothing
]


@pytest.mark.parametrize(
    "arch,prefill,decode", MLA_LAYOUTS, ids=lambda x: x if isinstance(x, str) else f"{x[0]}x{x[1]}"
)
def test_mla_outputs_equal_colocated(
    mla_models: dict[str, Path], arch: str, prefill: tuple[int, int], decode: tuple[int, int]
) -> None:
    model = mla_models[arch]
    specs = workload(seed=3, n=5)
    specs = (*specs, replace(specs[0], rid="one-token", max_new_tokens=1, room=4321))
    assert any(len(s.prompt) > 8 for s in specs)  # chunked prefill: the latent goes in pieces
    p_runs, d_runs = run_pd(model, prefill, decode, specs)
    check_groups(p_runs, Layout(*prefill))  # KV slots and rows back on both sides
    check_groups(d_runs, Layout(*decode))
    assert not any(r.failures for r in d_runs), [r.failures for r in d_runs]
    assert_same(merged(d_runs), run_colocated(model, specs), specs)
