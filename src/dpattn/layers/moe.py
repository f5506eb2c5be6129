"""MoE layer: experts split over world by intermediate dim (TP) or as whole experts (EP).

With EP (ep_size == tp_size) each rank runs its whole experts on the gathered tokens routed to
them; either way the output is a partial sum over world. Shared experts (DeepSeekMoE) are a
dense MLP split over world, added to the routed output before the layer's one reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.activation import ACTIVATIONS
from dpattn.layers.forward_context import get_forward_context
from dpattn.layers.linear import linear, pack_experts, pack_params
from dpattn.layers.mlp import DenseMLP, gate_up_loader
from dpattn.layers.weights import param, shard

_GROUPED_MM = hasattr(F, "grouped_mm")


@dataclass(frozen=True)
class Routing:
    """How a token's experts are chosen and weighted.

    Mixtral / Qwen3-MoE: softmax, top-k. DeepSeek V2: softmax; with groups, the groups ranked
    by their best expert. DeepSeek V3: sigmoid; a learned per-expert correction bias steers the
    choice (groups ranked by the sum of their top two, then experts) but the weights are the
    unbiased scores. Then optional renormalisation and the routed scaling factor.
    """

    top_k: int
    norm_topk_prob: bool
    scoring: str = "softmax"  # or "sigmoid"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"  # "max" (V2) or "top2" (V3: sum of the group's best two)
    scaling_factor: float = 1.0
    correction_bias: bool = False


def select_experts(
    logits: torch.Tensor, r: Routing, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 router logits [n, E] -> (weights [n, k] fp32, expert ids [n, k])."""
    scores = logits.sigmoid() if r.scoring == "sigmoid" else F.softmax(logits, dim=-1)
    choice = scores if bias is None else scores + bias
    if r.num_groups > 1:
        n, e = choice.shape
        grouped = choice.view(n, r.num_groups, e // r.num_groups)
        if r.group_score == "top2":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = torch.topk(group_scores, r.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // r.num_groups, dim=1), -torch.inf)
    experts = torch.topk(choice, r.top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if r.norm_topk_prob:
        # transformers' sigmoid routers add 1e-20 to the sum; the softmax ones do not
        eps = 1e-20 if r.scoring == "sigmoid" else 0.0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    if r.scaling_factor != 1.0:
        weights = weights * r.scaling_factor
    return weights, experts


class MoE(nn.Module):
    def __init__(
        self,
        ps: ParallelState,
        hidden: int,
        inter: int,
        num_experts: int,
        routing: Routing,
        act: str,
        dtype: torch.dtype,
        ep: bool,
        shared_inter: int = 0,
        gate_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        t, r = ps.tp_size, ps.rank
        if ep and num_experts % t:
            raise ValueError(f"{num_experts} experts cannot be split over {t} ranks (EP)")
        if not ep and inter % t:
            raise ValueError(f"expert intermediate size {inter} cannot be split over {t} ranks")
        if num_experts % routing.num_groups or routing.topk_groups > routing.num_groups:
            raise ValueError(
                f"{num_experts} experts do not form {routing.num_groups} groups "
                f"of which {routing.topk_groups} are kept"
            )
        self.num_experts, self.routing = num_experts, routing
        self.local_experts = num_experts // t if ep else num_experts
        self.first_expert = r * self.local_experts if ep else 0
        local_inter = inter if ep else inter // t
        e_parts, e_index = (t, r) if ep else (1, 0)
        i_parts, i_index = (1, 0) if ep else (t, r)
        gate_up = gate_up_loader(i_index, i_parts, 1)
        # DeepSeek keeps its router in fp32 (transformers' _keep_in_fp32_modules_strict)
        self.gate = param((num_experts, hidden), gate_dtype or dtype)
        if routing.correction_bias:
            self.e_score_correction_bias = param((num_experts,), torch.float32)
        self.shared_experts = (
            DenseMLP(ps, hidden, shared_inter, act, dtype, scattered=False)
            if shared_inter
            else None
        )
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

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def prepack(self) -> None:
        pack_params(self, "gate", quantize=False)  # the router stays in its own dtype
        pack_experts(self, "w13", "w2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding rows (attention-TP padding, MAX_LEN slots) are not routed: they would cost
        # expert compute and all land on the first experts (under EP: on rank 0).
        real = get_forward_context().real_rows
        if real is None:
            return self._moe(x)
        out = torch.zeros_like(x)
        out[real] = self._moe(x[real])
        return out

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        out = self._route(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def route_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen experts of each row and their weights (fp32)."""
        logits = linear(x.to(self.gate.dtype), self.gate).float()
        bias = self.e_score_correction_bias if self.routing.correction_bias else None
        return select_experts(logits, self.routing, bias)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) pairs by local expert once, one GEMM per expert slice."""
        weights, experts = self.route_weights(x)
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
        if (
            xs.dtype == torch.float32
            and xs.device.type == "cpu"
            and _GROUPED_MM
            and isinstance(self.w13, torch.Tensor)  # not quantized per expert
        ):
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
