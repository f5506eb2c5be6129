"""The messages between processes: frontend (Engine) -> DP group leaders -> frontend.

Every message on the wire is one of these frozen dataclasses (pickled over ZMQ; broadcast
inside attn_tp as objects). Frontend -> leader of DP group d: `TokenizedGenerateReq`,
`AbortReq`, `Wake` (ends an idle back-off), `Shutdown`. Leader -> frontend: `RankReady` once at
start, then `BatchOutput` after every step that ran a forward or produced outputs, carrying one
`RequestOutput` per request with news and the step's `StepStats`.

This module sits below everything that sends or receives (it imports only the sampling
parameters), so the scheduler, the rank loop and the frontend all speak the same types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpattn.executor.sampling_params import SamplingParams


@dataclass(frozen=True)
class BootstrapInfo:
    """Prefill/decode disaggregation: where the request's prefill server's bootstrap service is,
    and the room id (minted by the PD router) both servers know the request by."""

    host: str
    port: int
    room: int


@dataclass(frozen=True)
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    seed: int  # fixed by the frontend so every attn_tp rank draws the same tokens
    return_logprob: bool = False
    logprob_start_len: int = -1  # prompt logprobs from this position on (-1: none)
    top_logprobs_num: int = 0  # top alternatives per prompt / output token
    bootstrap: BootstrapInfo | None = None  # disaggregated serving only


@dataclass(frozen=True)
class AbortReq:
    rid: str


@dataclass(frozen=True)
class GenerateBatch:
    """Requests sent in one message (Engine.generate): a rank takes them all in one step, so a
    batch's first prefill is not split by the order in which single requests arrive."""

    reqs: list[TokenizedGenerateReq]


@dataclass(frozen=True)
class Wake:
    """Cuts an idle group's poll back-off short (another group just got work)."""


@dataclass(frozen=True)
class Shutdown:
    """Every rank leaves its loop in the same iteration (the flag rides on the MLP sync)."""


@dataclass(frozen=True)
class FlushCache:
    """Drop the DP group's cached prefixes that no request holds (SGLang's /flush_cache)."""


RankInput = TokenizedGenerateReq | GenerateBatch | AbortReq | Wake | Shutdown | FlushCache


@dataclass(frozen=True)
class RequestOutput:
    """One step's news about one request."""

    rid: str
    new_ids: list[int]
    new_logprobs: list[float]
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    # With return_logprob: top alternatives of the new tokens, (logprob, id) each; and, with the
    # first token, the prompt's logprobs (from logprob_start_len) and their alternatives.
    new_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    error: str = ""  # why an aborted request ended, when the engine knows (disaggregation)
    error_status: int = 0  # 400: the request itself was at fault (its grammar did not compile)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (with the first news)


@dataclass(frozen=True)
class StepStats:
    """What one scheduler iteration of one DP group did (metrics and bench read it)."""

    forward_mode: str = "none"
    num_tokens: int = 0
    global_num_tokens: tuple[int, ...] = ()
    padded_tokens: int = 0  # rows the MLP ran on (B); real ones are sum(global_num_tokens)
    padding_mode: str = ""
    idle_batch: bool = False
    extending_groups: int = 0
    sync_s: float = 0.0  # MLP sync wall time = wait for the slowest rank + the collective
    sync_wait_s: float = 0.0
    sync_collective_s: float = 0.0
    forward_s: float = 0.0  # the model forward alone (ModelRunner.forward)
    step_s: float = 0.0  # the whole iteration: batch, sync, forward, sampling, outputs
    running: int = 0
    queued: int = 0
    retractions: int = 0  # running requests the DP group sent back to wait, since start
    # Constrained decoding: rows sampled under a grammar this step, and the time their masks
    # cost the step (waiting for the fill thread, then applying the bitmask to the logits).
    constrained: int = 0
    grammar_s: float = 0.0
    grammar_queue: int = 0  # requests waiting for their grammar to compile
    # Pipeline stages: micro-batches whose output message went around the ring, and those whose
    # message was skipped (nothing to send: a middle prefill chunk), since start.
    pp_outputs_sent: int = 0
    pp_outputs_skipped: int = 0
    # Disaggregated servers: requests per queue stage, cumulative transfer figures
    # (disaggregation/metrics.py).
    disaggregation: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RankReady:
    dp_rank: int
    kv_free: int
    # The effective limits the frontend validates requests against (model vocab, not tokenizer).
    context_length: int = 0
    vocab_size: int = 0
    kv_source: str = ""  # how the KV pool was sized, for the start-up log
    kv_bytes_per_token: int = 0  # this rank's KV cache bytes per token (every layer)
    weight_bytes: int = 0  # this rank's weights, in the format they run in
    rss_bytes: int = 0  # the rank process's resident memory once ready (weights + KV pool)


@dataclass(frozen=True)
class BatchOutput:
    dp_rank: int
    outputs: list[RequestOutput]
    stats: StepStats
    kv_free: int  # slots a request can get: free ones and cached ones no request holds
    flushed: bool = False  # this step carried out a FlushCache
    kv_cached: int = 0  # slots the prefix cache holds (locked or not)
