"""Prometheus metrics of the server and of the engine's scheduler steps (own registry).

Series are labelled `dp_rank` / `tp_rank`: the DP group and the attention-TP rank of the rank that
reports it (the group's attn_tp leader, so `tp_rank="0"`). Step metrics are fed from
`Engine.step_listeners` on the engine's reader thread; prometheus-client is thread-safe.

With pipeline stages (pp_size > 1) the reporting rank is stage 0's leader, and
`dpattn_pp_output_messages_total{result="sent"|"skipped"}` counts the micro-batches whose output
message went around the ring and those that sent none (a middle prefill chunk).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dpattn.messages import StepStats

LEADER_TP_RANK = "0"
FORWARD_MODES = ("extend", "decode", "mixed", "idle")
PP_RESULTS = ("sent", "skipped")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SYNC_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# No `*_created` twin of every counter and histogram (as vLLM and SGLang do): the creation
# timestamps double the exposition and no dashboard reads them. The switch is process-wide.
disable_created_metrics()


class ServerMetrics:
    def __init__(self, dp_size: int, pp_size: int = 1) -> None:
        self.dp_size = dp_size
        self.pp_size = pp_size
        self.registry = r = CollectorRegistry()
        rank = ["dp_rank", "tp_rank"]

        def gauge(name: str, doc: str, labels: list[str] = rank) -> Gauge:
            return Gauge(f"dpattn_{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str] = rank) -> Counter:
            return Counter(f"dpattn_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Any, labels: list[str] = rank) -> Histogram:
            return Histogram(f"dpattn_{name}", doc, labels, registry=r, buckets=buckets)

        self.running = gauge("num_requests_running", "Requests decoding on the DP group")
        self.queued = gauge("num_requests_queued", "Requests waiting in the DP group's scheduler")
        self.grammar_queue = gauge(
            "num_requests_grammar_queue", "Requests waiting for their grammar to compile"
        )
        self.constrained = counter("constrained_rows", "Tokens sampled under a grammar's mask")
        self.grammar_s = counter(
            "grammar_mask_seconds", "Step time spent on grammar masks (fill wait and apply)"
        )
        self.kv_used = gauge("kv_cache_used_tokens", "KV cache slots in use")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of the KV cache pool in use")
        self.kv_cached = gauge(
            "prefix_cache_tokens", "KV slots in the prefix cache (evictable unless in use)"
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        # hit rate = rate(cached_tokens) / rate(prompt_tokens)
        self.cached_tokens = counter(
            "cached_tokens", "Prompt tokens served from the DP group's prefix cache"
        )
        self.finished = counter(
            "requests_finished", "Finished requests by reason", [*rank, "finish_reason"]
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency", _LATENCY_BUCKETS)
        self.forward_steps = counter("forward_steps", "Forward steps by mode", [*rank, "mode"])
        self.idle_batches = counter(
            "idle_batches", "Steps this DP group ran an idle batch for the others' MLP"
        )
        self.extending_groups = histogram(
            "dp_extending_groups",
            "DP cooperation: how many DP groups were extending in a forward step",
            [*range(dp_size + 1), float("inf")],
        )
        self.sync_s = histogram("mlp_sync_seconds", "MLP sync wall time per step", _SYNC_BUCKETS)
        self.mlp_padded = counter("mlp_padded_tokens", "Rows the MLP ran on, padding included")
        self.mlp_real = counter("mlp_real_tokens", "Real tokens among the MLP rows")
        self.padding_mode = counter(
            "dp_padding_mode_steps", "Forward steps by DP padding mode", [*rank, "padding_mode"]
        )
        self.inflight = Gauge(
            "dpattn_server_requests_in_flight", "Engine requests the server holds", registry=r
        )
        self.rejected = Counter(
            "dpattn_requests_rejected", "Requests refused before routing", ["reason"], registry=r
        )
        # Pipeline output messages: registered only where there is a pipeline (pp_size > 1).
        # The ranks report cumulative counts; the counter takes the increase since the last step.
        self.pp_outputs = (
            counter(
                "pp_output_messages",
                "Pipeline micro-batches whose output message was sent around the ring, or skipped",
                [*rank, "result"],
            )
            if pp_size > 1
            else None
        )
        self._pp_last: dict[int, tuple[int, int]] = {}
        for d in range(dp_size):  # every rank's series exists from the start
            lbl = self.labels(d)
            for metric in (self.running, self.queued, self.kv_used, self.kv_usage):
                metric.labels(*lbl)
            for metric in (self.grammar_queue, self.constrained, self.grammar_s):
                metric.labels(*lbl)
            for metric in (self.prompt_tokens, self.generation_tokens, self.idle_batches):
                metric.labels(*lbl)
            for metric in (self.ttft, self.itl, self.e2e, self.extending_groups, self.sync_s):
                metric.labels(*lbl)
            self.mlp_padded.labels(*lbl)
            self.mlp_real.labels(*lbl)
            for mode in FORWARD_MODES:
                self.forward_steps.labels(*lbl, mode)
            for result in PP_RESULTS if self.pp_outputs is not None else ():
                self.pp_outputs.labels(*lbl, result)

    @staticmethod
    def labels(dp_rank: int) -> tuple[str, str]:
        return str(dp_rank), LEADER_TP_RANK

    def on_step(self, dp_rank: int, stats: StepStats, kv_free: int) -> None:
        """Engine step listener (reader thread, engine lock held: stay quick)."""
        lbl = self.labels(dp_rank)
        self.running.labels(*lbl).set(stats.running)
        self.queued.labels(*lbl).set(stats.queued)
        self.grammar_queue.labels(*lbl).set(stats.grammar_queue)
        if self.pp_outputs is not None:  # before the early return: a step without a forward
            self._count_pp_outputs(self.pp_outputs, dp_rank, stats)  # may apply results
        if stats.forward_mode not in FORWARD_MODES:
            return  # no forward ran this step (e.g. only an abort was reported)
        self.forward_steps.labels(*lbl, stats.forward_mode).inc()
        if stats.idle_batch:
            self.idle_batches.labels(*lbl).inc()
        self.extending_groups.labels(*lbl).observe(stats.extending_groups)
        self.sync_s.labels(*lbl).observe(stats.sync_s)
        if stats.constrained:
            self.constrained.labels(*lbl).inc(stats.constrained)
            self.grammar_s.labels(*lbl).inc(stats.grammar_s)
        self.mlp_padded.labels(*lbl).inc(stats.padded_tokens)
        self.mlp_real.labels(*lbl).inc(sum(stats.global_num_tokens))
        padding_mode = getattr(stats, "padding_mode", None)
        if padding_mode:
            self.padding_mode.labels(*lbl, str(padding_mode)).inc()

    def _count_pp_outputs(self, counter: Counter, dp_rank: int, stats: StepStats) -> None:
        lbl = self.labels(dp_rank)
        sent, skipped = self._pp_last.get(dp_rank, (0, 0))
        for result, now, before in (
            ("sent", stats.pp_outputs_sent, sent),
            ("skipped", stats.pp_outputs_skipped, skipped),
        ):
            if now > before:
                counter.labels(*lbl, result).inc(now - before)
        # never backwards (a report is cumulative since the ranks started)
        self._pp_last[dp_rank] = (
            max(sent, stats.pp_outputs_sent),
            max(skipped, stats.pp_outputs_skipped),
        )

    def set_kv(self, kv_free: list[int], kv_total: list[int], kv_cached: list[int]) -> None:
        for d, (free, total, cached) in enumerate(zip(kv_free, kv_total, kv_cached)):
            lbl = self.labels(d)
            self.kv_cached.labels(*lbl).set(cached)
            self.kv_used.labels(*lbl).set(total - free)
            self.kv_usage.labels(*lbl).set((total - free) / total if total else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
