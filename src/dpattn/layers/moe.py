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
from dpattn.layers.forward_context import get_forward_context
from dpattn.layers.linear import linear, pack_params
from dpattn.layers.mlp import gate_up_loader
from dpattn.layers.weights import param, shard

_GROUPED_MM = hasattr(F, "grouped_mm")


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

    def prepack(self) -> None:
        pack_params(self, "gate")  # the experts run grouped GEMMs over their 3-d weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding rows (attention-TP padding, MAX_LEN slots) are not routed: they would cost
        # expert compute and all land on the first experts (under EP: on rank 0).
        real = get_forward_context().real_rows
        if real is None:
            return self._route(x)
        out = torch.zeros_like(x)
        out[real] = self._route(x[real])
        return out

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) pairs by local expert once, one GEMM per expert slice."""
        probs = F.softmax(linear(x, self.gate).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if x.is_cuda:
            return self._route_static(x, weights, experts)
        local = experts.flatten() - self.first_expert
        mine = (local >= 0) & (local < self.local_experts)  # EP: other ranks' experts drop out
        key = torch.where(mine, local, self.local_experts)
        order = torch.argsort(key, stable=True)[: int(mine.sum())]
        counts = torch.bincount(local[order], minlength=self.local_experts)
        tok = order // self.top_k
        y = self._experts(x[tok], counts) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)

    def _route_static(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Every local expert on every row, weighted by its routing weight (0 if not chosen).

        No data-dependent shape or host read: nothing syncs the GPU and a CUDA graph can
        record it. Costs local_experts / top_k times the routed compute (a fused MoE kernel
        would remove that; the tiny and small MoE models this runs are dominated by launches).
        """
        ids = torch.arange(self.local_experts, device=x.device) + self.first_expert
        # [rows, local_experts]: the weight each row gives each local expert
        w = ((experts[:, :, None] == ids) * weights[:, :, None]).sum(dim=1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.local_experts):
            gate, up = linear(x, self.w13[e]).chunk(2, dim=-1)
            out += linear(self.act(gate) * up, self.w2[e]) * w[:, e : e + 1]
        return out

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs sorted by expert, counts[e] rows each: the experts' MLPs over their slices."""
        if xs.shape[0] == 0:
            return xs.new_zeros(xs.shape)
        if xs.dtype == torch.float32 and xs.device.type == "cpu" and _GROUPED_MM:
            # fp32 on CPU: one grouped GEMM beats the per-expert loop (bf16 does not, measured)
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(xs, self.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            h = (self.act(gate) * up).contiguous()
            return F.grouped_mm(h, self.w2.transpose(1, 2), offs=offs)
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                gate, up = linear(xs[start : start + c], self.w13[e]).chunk(2, dim=-1)
                outs.append(linear(self.act(gate) * up, self.w2[e]))
                start += c
        return torch.cat(outs)
