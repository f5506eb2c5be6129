"""Which decode steps may replay a CUDA graph, and at which captured size (pure; CPU-tested).

A graph is captured per (batch size, KV length bucket). Batch sizes are tokens per DP group:
the DP gather of a replayed step always uses MAX_LEN padding with every group's slot equal to
the captured size (docs/design.md §4), so the sizes are multiples of the attention-TP width A.
The KV bucket only shapes the rank's own attention; the collectives depend on the batch size
alone, so the ranks of different DP groups may replay different buckets of one batch size.
"""

from __future__ import annotations

from dpattn.executor.forward_batch import ForwardMode
from dpattn.layers.dp_attention import pad_to

MIN_KV_BUCKET = 256
# Modes whose step is a static-shape decode (IDLE: every row padding; PREBUILT: its inner idle).
GRAPH_MODES = (ForwardMode.DECODE, ForwardMode.IDLE, ForwardMode.PREBUILT)


def capture_batch_sizes(max_bs: int, attn_tp_size: int, max_running_requests: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_bs, and max_bs (SGLang's ladder), as multiples of A,
    capped at the most tokens a DP group can decode at once."""
    cap = pad_to(min(max_bs, max_running_requests), attn_tp_size)
    ladder = [1, 2, 4, 8, *range(16, max_bs + 1, 8), max_bs]
    sizes = sorted({min(pad_to(b, attn_tp_size), cap) for b in ladder if b <= max(max_bs, 1)})
    return [b for b in sizes if b > 0]


def capture_kv_buckets(max_seq_len: int, context_length: int) -> list[int]:
    """KV lengths a graph attends over: 256, 512, ... up to min(max_seq_len, context)."""
    top = max(1, min(max_seq_len, context_length))
    buckets, b = [], MIN_KV_BUCKET
    while b < top:
        buckets.append(b)
        b *= 2
    return [*buckets, top]


def bucket(value: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `value` (None: larger than every capture)."""
    return next((s for s in sizes if s >= value), None)


def local_vote(
    mode: ForwardMode | None,
    num_tokens: int,
    max_seq_len: int,
    batch_sizes: list[int],
    kv_buckets: list[int],
) -> bool:
    """This rank's `can_run_graph` for the MLP sync: a decode (or no work at all) that fits a
    captured batch size and KV bucket. The step replays only if every rank votes yes (min)."""
    if not batch_sizes or not kv_buckets:
        return False
    if mode is not None and mode not in GRAPH_MODES:
        return False
    return num_tokens <= batch_sizes[-1] and max_seq_len <= kv_buckets[-1]


def graph_batch_size(global_num_tokens: list[int], batch_sizes: list[int]) -> int:
    """The captured size every DP group pads to: from gathered values, so equal on all ranks."""
    size = bucket(max(global_num_tokens, default=0), batch_sizes)
    if size is None:  # the vote guarantees a fit; a miss means a rank voted wrongly
        raise ValueError(
            f"graph replay voted for {global_num_tokens} tokens per DP group, but the largest "
            f"captured batch is {batch_sizes[-1] if batch_sizes else 0}"
        )
    return size


def graph_unavailable_reason(
    device_type: str,
    collectives_capturable: bool,
    disabled: bool,
    world_size: int,
    dp_padding_mode: str = "auto",
) -> str | None:
    """Why this rank captures no graphs (None: it captures them)."""
    if disabled:
        return "--disable-cuda-graph"
    if device_type != "cuda":
        return "CUDA graphs need --device cuda"
    if dp_padding_mode == "sum_len":  # a replay's collectives were recorded with MAX_LEN slots
        return "--dp-padding-mode sum_len: a graph replay pads with MAX_LEN"
    if world_size > 1 and not collectives_capturable:
        # A graph replays kernels, not Python: the thread rendezvous (and gloo) would be skipped.
        return "the model's collectives are not NCCL ones (thread backend): they cannot be captured"
    return None
