"""Pipeline stages on the model side (issue 27): which decoder layers one stage's model holds.

A stage owns a contiguous range [start, end) of decoder layers, by their GLOBAL index: stage 0
also the embedding, the last stage also the final norm and the LM head. Its model constructs
only those modules (parameters keep their global names, `layers.{i}.*`, so checkpoint keys map
onto them unchanged), reads only their weights, and its KV pool holds only its layers (a layer's
`cache_layer` is its index in that pool: global index - start). Everything a layer does that
depends on its index (Gemma 3's sliding / global pattern and rope, DeepSeek's first dense layers,
Qwen3-MoE's sparse step) is decided from the global index, so a split model computes exactly
what the whole one does.

Between stages travels one tensor per DP group: the residual stream after the stage's last layer
([n, hidden], identical on the group's attn_tp ranks). dpattn's decoder layers add their
residual inside the layer (x -> x + attn -> + mlp), so there is no separate "residual" tensor to
carry, unlike engines that defer the add into the next layer's fused norm.

The default is one stage holding everything (`StageLayers.whole`): the model is then built and
runs exactly as without stages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpattn.distributed.layout import layer_partition
from dpattn.distributed.parallel_state import ParallelState
from dpattn.layers.embedding import VocabParallelEmbedding
from dpattn.layers.norm import RMSNorm

_LAYER = re.compile(r"^layers\.(\d+)\.")


class StagePartitionError(ValueError):
    """A pipeline size or layer partition that does not fit the model (a user error: exit 2)."""


@dataclass(frozen=True)
class StageLayers:
    """Decoder layers [start, end) by global index; `first`: the stage holds the embedding,
    `last`: the final norm and the LM head."""

    start: int
    end: int
    first: bool
    last: bool

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"a stage needs at least one layer: [{self.start}, {self.end})")
        if self.first != (self.start == 0):
            raise ValueError(f"the first stage starts at layer 0, not {self.start}")

    @classmethod
    def whole(cls, num_layers: int) -> StageLayers:
        """The one stage of a model without pipeline parallelism."""
        return cls(0, num_layers, True, True)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def is_whole(self) -> bool:
        return self.first and self.last

    def cache_layer(self, layer_id: int) -> int:
        """The index of global layer `layer_id` in this stage's KV pool."""
        if not self.start <= layer_id < self.end:
            raise ValueError(f"layer {layer_id} is not in stage [{self.start}, {self.end})")
        return layer_id - self.start

    def param_name(self, name: str, tied: bool) -> str | None:
        """Our parameter name `name` (a checkpoint key already mapped by the model) if this
        stage holds it, else None (not read). With tied embeddings a last stage that is not the
        first has its own LM head: it reads the embedding's weight under that name."""
        if self.is_whole:
            return name
        m = _LAYER.match(name)
        if m:
            return name if self.start <= int(m[1]) < self.end else None
        if name.startswith("embed_tokens."):
            if self.first:
                return name
            return "lm_head." + name.removeprefix("embed_tokens.") if tied and self.last else None
        if name.startswith(("norm.", "lm_head.")):
            return name if self.last else None
        return name


def partition_layers(
    num_layers: int, pp_size: int, partition: Sequence[int] | None = None
) -> list[StageLayers]:
    """The stages of a `pp_size` pipeline over `num_layers` decoder layers.

    `partition`: layers per stage (--pp-layer-partition); the split and its errors are
    distributed/layout.py's `layer_partition` (4 layers over 3 stages: [1, 2, 1])."""
    try:
        bounds = layer_partition(
            num_layers, pp_size, None if partition is None else list(partition)
        )
    except ValueError as e:
        raise StagePartitionError(str(e)) from None
    last = len(bounds) - 1
    return [StageLayers(start, end, i == 0, i == last) for i, (start, end) in enumerate(bounds)]


class StageLayerList(nn.Module):
    """A stage's decoder layers, registered under their global index (`layers.{i}.*` names,
    as in the checkpoint) and iterated / indexed by position in the stage."""

    def __init__(self, stage: StageLayers, build: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.start = stage.start
        for i in range(stage.start, stage.end):
            self.add_module(str(i), build(i))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Any:
        n = len(self._modules)
        if not -n <= index < n:
            raise IndexError(f"layer index {index} out of range for a stage of {n} layers")
        return self._modules[str(self.start + index % n)]


def init_stage_ends(
    model: nn.Module,
    cfg: Any,
    ps: ParallelState,
    dtype: torch.dtype,
    stage: StageLayers,
    *,
    norm_offset: float = 0.0,
    tie_default: bool = False,
) -> None:
    """Give `model` the embedding (first stage), the final norm and the LM head (last stage;
    None where the stage has none). Tied embeddings share one module only when one stage holds
    both ends; a last stage without the embedding has its own head, read from the embedding's
    weight (StageLayers.param_name)."""
    h = cfg.hidden_size
    tied = bool(getattr(cfg, "tie_word_embeddings", tie_default))
    model.tie_word_embeddings = tied
    embed = VocabParallelEmbedding(ps, cfg.vocab_size, h, dtype) if stage.first else None
    model.embed_tokens = embed
    model.norm = RMSNorm(h, cfg.rms_norm_eps, dtype, norm_offset) if stage.last else None
    head = None
    if stage.last:
        head = (
            embed
            if tied and embed is not None
            else VocabParallelEmbedding(ps, cfg.vocab_size, h, dtype, lookup=False)
        )
    model.lm_head = head
    if embed is not None:
        embed.serves_logits = head is embed  # prepack keeps an LM-head copy only then
