"""Prefill/decode disaggregation (docs/design.md §8, README "Disaggregation").

A prefill server computes the prompt's KV cache and the first output token; a decode server
receives both and generates the rest. Each side keeps its own (T, D) layout and the MLP sync.

| module | concern |
| --- | --- |
| `states.py` | transfer states (KVPoll) and their min-consensus over the attention-TP group |
| `layout.py` | KV layout (GQA or MLA latent), rank info, which prefill rank sends which KV heads where |
| `bootstrap.py` | the prefill server's HTTP bootstrap service; registration and look-up |
| `wire.py` | the messages between prefill and decode ranks |
| `transfer.py` | transfer backend interfaces and the `fake` backend |
| `zmq_sockets.py` | a rank's bound PULL socket and its PUSH sockets to peers |
| `transfer_zmq_prefill.py` | `zmq` backend, prefill side: KV heads per layer, then the aux data |
| `transfer_zmq_decode.py` | `zmq` backend, decode side: receivers writing into reserved slots |
| `metrics.py` | Prometheus metrics: queue stages, bytes, transfers, latency |
| `frontend.py` | the Engine's share: bootstrap service start, DP group of a request |
| `liveness.py` | decode side: prefill look-ups and heartbeats off the rank loop |
| `prefill.py` | PrefillScheduler: bootstrap -> waiting -> forward -> inflight queues |
| `prefill_pipeline.py` | the same with pipeline stages: stage 0 decides, each stage sends its layers |
| `decode.py` | DecodeScheduler: prealloc -> transfer -> PREBUILT batch -> running |
| `factory.py` | the rank loop's scheduler for a disaggregation mode |
| `pd_router.py` | `dpattn router --pd-disaggregation` (HTTP) |
"""
