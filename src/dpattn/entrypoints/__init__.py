"""Entrypoints — the frontend process: `Engine` (Python API), the HTTP server (OpenAI and native
`/generate` routes), streaming detokenization and Prometheus metrics. Tokenizes, validates and
sends typed messages (dpattn.messages) to the DP group leaders; never touches a tensor."""
