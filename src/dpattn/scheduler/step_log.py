"""The periodic step line of one DP group, in SGLang's words, logged by the group's leader:

    Prefill batch. #new-token: 32, token usage: 0.01, #running-req: 0, #queue-req: 3
    Decode batch. #running-req: 4, #token: 220, token usage: 0.05, gen throughput (token/s):
    41.37, #queue-req: 0

A prefill line for every step that extends, a decode line every `interval` decode steps (with
the throughput of the tokens decoded since the previous decode line, as SGLang measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpattn.messages import StepStats


@dataclass
class StepLog:
    kv_total: int  # KV slots of this rank's pool
    interval: int = 40  # decode steps between two decode lines
    _decode_steps: int = 0
    _tokens: int = 0  # decoded since the last decode line
    _since: float | None = None

    def update(self, stats: StepStats, kv_free: int, now: float) -> str | None:
        """The line to log after this step, if any."""
        used = self.kv_total - kv_free
        usage = used / self.kv_total if self.kv_total else 0.0
        if stats.forward_mode in ("extend", "mixed"):
            return (
                f"Prefill batch. #new-token: {stats.num_tokens}, token usage: {usage:.2f}, "
                f"#running-req: {stats.running}, #queue-req: {stats.queued}"
            )
        if stats.forward_mode != "decode":
            return None
        if self._since is None:
            self._since = now
        self._decode_steps += 1
        self._tokens += stats.num_tokens
        if self._decode_steps % self.interval:
            return None
        elapsed = now - self._since
        throughput = self._tokens / elapsed if elapsed > 0 else 0.0
        self._since, self._tokens = now, 0
        return (
            f"Decode batch. #running-req: {stats.running}, #token: {used}, "
            f"token usage: {usage:.2f}, gen throughput (token/s): {throughput:.2f}, "
            f"#queue-req: {stats.queued}"
        )
