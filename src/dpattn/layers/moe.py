"""MoE layer: experts split over world by intermediate dim (TP) or as whole experts (EP).

With EP (ep_size == tp_size) each rank runs its whole experts on the gathered tokens routed to
them; either way the output is a partial sum over world.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.activation import ACTIVATIONS
from dpattn.layers.mlp import gate_up_loader
from dpattn.layers.weights import param, shard


class MoE(nn.Module):
    def __init__(
        self,
        ps: ParallelState,
        hidden: int,
        inter: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        act: str,
        dtype: torch.dtype,
        ep: bool,
    ) -> None:
        super().__init__()
        t, r = ps.tp_size, ps.rank
        if ep and num_experts % t:
            raise ValueError(f"{num_experts} experts cannot be split over {t} ranks (EP)")
        if not ep and inter % t:
            raise ValueError(f"expert intermediate size {inter} cannot be split over {t} ranks")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.local_experts = num_experts // t if ep else num_experts
        self.first_expert = r * self.local_experts if ep else 0
        local_inter = inter if ep else inter // t
        e_parts, e_index = (t, r) if ep else (1, 0)
        i_parts, i_index = (1, 0) if ep else (t, r)
        gate_up = gate_up_loader(i_index, i_parts, 1)
        self.gate = param((num_experts, hidden), dtype)
        self.w13 = param(
            (self.local_experts, 2 * local_inter, hidden),
            dtype,
            lambda f: gate_up(shard(f, 0, e_index, e_parts)),
        )
        self.w2 = param(
            (self.local_experts, hidden, local_inter),
            dtype,
            lambda f: shard(shard(f, 0, e_index, e_parts), 2, i_index, i_parts),
        )
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(F.linear(x, self.gate).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.local_experts):
            tok, slot = torch.where(experts == self.first_expert + e)
            if tok.numel() == 0:
                continue
            gate, up = F.linear(x[tok], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.w2[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out
