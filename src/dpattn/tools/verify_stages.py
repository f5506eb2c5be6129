"""verify across pipeline stages (`dpattn verify --pp-size P`; docs/design.md §1, §10).

Every rank builds the same batches (verify's schedule is deterministic) and runs the MLP sync
over its own stage's world group. A step then goes through the lane: stage 0 embeds the ids,
each stage before the last sends its rows to the next (`forward_hidden`), and the last stage
computes the logits and sends each row's greedy token back to the other stages, which need the
ids to build the next step's batch (stage 0 embeds them; the others only count them). Only the
last stage's logits are compared with transformers, so rows sent to the wrong rank, or a stage
holding the wrong layers, fail the comparison.
"""

from __future__ import annotations

from typing import Any

import torch

from dpattn.distributed.layout import Layout
from dpattn.distributed.parallel_state import ParallelState
from dpattn.executor.forward_batch import ForwardBatch
from dpattn.executor.model_runner import ModelRunner
from dpattn.layers.dp_attention import GatherPlan


def stage_forward(
    runner: ModelRunner, ps: ParallelState, batch: ForwardBatch, plan: GatherPlan, step: int
) -> tuple[torch.Tensor | None, list[int]]:
    """This rank's part of one step: (the logits rows, None before the last stage; the greedy
    next token of each row, the same on every stage)."""
    link = ps.pp
    if link is None:  # the whole model on every rank
        logits = runner.forward(batch, plan)
        return logits, [int(row.argmax()) for row in logits]
    tag = f"step{step}"
    hidden = None
    if not ps.is_first_stage:
        received = link.recv(tag=tag)
        assert isinstance(received, dict)
        hidden = received["hidden"]
    if not ps.is_last_stage:
        link.send({"hidden": runner.forward_hidden(batch, hidden, plan)}, tag=tag)
        ids: list[int] = link.recv_object(ps.pp_size - 1, tag=tag)
        return None, ids
    logits = runner.forward(batch, plan, hidden)
    ids = [int(row.argmax()) for row in logits]
    for stage in range(ps.pp_size - 1):  # stage 0 is the ring's next; the others direct
        link.send_object(ids, stage, tag=tag)
    return logits, ids


def last_stage_results(results: list[dict[str, Any]], layout: Layout) -> list[dict[str, Any]]:
    """The last stage's T results (the logits), after checking every rank against them: a DP
    group's ranks in every stage saw the same tokens and steps, and its last-stage ranks the
    same logits. `results`: all P * T ranks' in global rank order."""
    last = results[-layout.tp_size :]
    a, last_stage = layout.attn_tp_size, layout.pp_size - 1
    for g, res in enumerate(results):
        s = layout.stage(g)
        lead = last[layout.dp_rank(g) * a]
        where = f"rank {layout.rank_in_stage(g)}" + (f" of stage {s}" if layout.pp_size > 1 else "")
        if res["tokens"] != lead["tokens"] or res["steps"] != lead["steps"]:
            raise AssertionError(f"{where} disagrees with its DP group leader")
        if s == last_stage and res["logits"] != lead["logits"]:
            raise AssertionError(f"{where} disagrees with its DP group leader")
    return last
