"""Scheduler — runs inside every rank process: request and batch state, continuous batching
(chunked prefill, decode, retraction) and the MLP sync that keeps all ranks in lock-step."""
