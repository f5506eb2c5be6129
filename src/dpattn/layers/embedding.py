"""Vocab-parallel embedding and LM head over attn_tp (vocab padded to a multiple of A)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.weights import param


class VocabParallelEmbedding(nn.Module):
    def __init__(self, ps: ParallelState, vocab_size: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.ps = ps
        a = ps.attn_tp_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // a)
        self.lo = ps.attn_tp_rank * self.shard_size

        def load(full: torch.Tensor) -> torch.Tensor:
            out = full.new_zeros((self.shard_size, full.shape[1]))
            rows = full[self.lo : self.lo + self.shard_size]
            out[: rows.shape[0]] = rows
            return out

        self.weight = param((self.shard_size, hidden), dtype, load)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.attn_tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.lo
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return self.ps.attn_tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: local vocab shard, then gathered over attn_tp to full-vocab logits."""
        local = F.linear(hidden, self.weight)
        if self.ps.attn_tp_size == 1:
            return local[:, : self.vocab_size]
        full = self.ps.attn_tp.all_gather(local.t().contiguous()).t()
        return full[:, : self.vocab_size]
