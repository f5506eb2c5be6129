"""Prometheus metrics of a disaggregated server, per DP group: requests in each queue stage,
KV bytes moved, transfers by outcome and their summed latency (the ranks report cumulative
figures in StepStats.disaggregation; this listener turns them into counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from dpattn.messages import StepStats

STAGES = ("bootstrap", "waiting", "inflight", "prealloc", "transfer")
RANK = ["dp_rank", "tp_rank"]


class DisaggMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue = Gauge(
            "dpattn_disagg_queue_requests",
            "Requests in each disaggregation queue stage",
            [*RANK, "stage"],
            registry=registry,
        )
        self.bytes = Counter(
            "dpattn_disagg_transfer_bytes",
            "KV bytes sent (prefill) or received (decode) by the DP group's leader",
            RANK,
            registry=registry,
        )
        self.transfers = Counter(
            "dpattn_disagg_transfers",
            "KV transfers by outcome (success, failed)",
            [*RANK, "outcome"],
            registry=registry,
        )
        self.seconds = Counter(
            "dpattn_disagg_transfer_seconds",
            "Decode: seconds from reserving a request's KV to having all of it, summed "
            "(mean latency = rate of this / rate of successful transfers)",
            RANK,
            registry=registry,
        )
        self._last: dict[int, dict[str, float]] = {}

    def on_step(self, dp_rank: int, stats: StepStats, kv_free: int) -> None:
        d = stats.disaggregation
        if not d:
            return
        lbl = (str(dp_rank), "0")
        for stage in STAGES:
            if stage in d:
                self.queue.labels(*lbl, stage).set(d[stage])
        last = self._last.setdefault(dp_rank, {})
        for key, inc in (
            ("bytes", self.bytes.labels(*lbl).inc),
            ("done", self.transfers.labels(*lbl, "success").inc),
            ("failed", self.transfers.labels(*lbl, "failed").inc),
            ("seconds", self.seconds.labels(*lbl).inc),
        ):
            delta = d.get(key, 0.0) - last.get(key, 0.0)
            if delta > 0:
                inc(delta)
            last[key] = d.get(key, 0.0)
