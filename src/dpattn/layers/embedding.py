"""Vocab-parallel embedding and LM head over attn_tp (vocab padded to a multiple of A)."""

from __future__ import annotations

import torch
from torch import nn

from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.linear import embedding, linear, lookup_table, pack_weight
from dpattn.layers.quant import GroupQuant, Int4Weight
from dpattn.layers.weights import param


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        ps: ParallelState,
        vocab_size: int,
        hidden: int,
        dtype: torch.dtype,
        lookup: bool = True,  # False: an untied LM head (only logits)
    ) -> None:
        super().__init__()
        self.lookup = lookup
        self.serves_logits = True  # the model sets False for an untied embedding (prepack)
        self.ps = ps
        a = ps.attn_tp_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // a)
        self.lo = ps.attn_tp_rank * self.shard_size

        def load(full: torch.Tensor) -> torch.Tensor:
            """Rows [lo, lo + shard_size) of the vocab, zero rows past its end.

            Only narrow / new_zeros / cat, so a lazy checkpoint tensor reads just these rows.
            """
            vocab = full.shape[0]
            start = min(self.lo, vocab)
            rows = full.narrow(0, start, min(self.shard_size, vocab - start))
            pad = self.shard_size - rows.shape[0]
            if pad == 0:
                return rows
            return torch.cat([rows, full.new_zeros((pad, *full.shape[1:]))])

        self.weight = param((self.shard_size, hidden), dtype, load)
        self.head: torch.Tensor | Int4Weight | None = None  # the LM head's packed copy
        self.table: torch.Tensor | GroupQuant | None = None  # lookup rows, when not `weight`

    def prepack(self) -> None:
        # Tied embeddings keep their rows for the lookup (a bf16 copy's `plain` is those rows;
        # a GGUF model's integer rows replace them); an untied head needs only the copy.
        weight = self.weight if self.lookup else self._parameters.pop("weight")
        if self.serves_logits:
            self.head = pack_weight(weight)
        if self.lookup:
            table = lookup_table(weight)
            if table is not weight:
                del self.weight
                self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weight if self.table is None else self.table
        if self.ps.attn_tp_size == 1:
            return embedding(ids, table)
        local = ids - self.lo
        outside = (local < 0) | (local >= self.shard_size)
        out = embedding(local.masked_fill(outside, 0), table)
        out = out.masked_fill(outside[:, None], 0)
        return self.ps.attn_tp.all_reduce(out)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits: token ids [lo, lo + shard_size)."""
        # Packed: one row of a bf16 head reads its plain rows (the lookup's, when tied): half
        # the bytes (Gemma's head, batch-1 decode on 2 cores: 20 ms vs 34 ms, measured).
        return linear(hidden, self.weight if self.head is None else self.head)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: local vocab shard, then gathered over attn_tp to full-vocab logits."""
        local = self.local_logits(hidden)
        if self.ps.attn_tp_size == 1:
            return local[:, : self.vocab_size]
        full = self.ps.attn_tp.all_gather(local.t().contiguous()).t()
        return full[:, : self.vocab_size]
