"""KV cache — inside every rank process: the paged KV pool over this rank's KV heads and the
request-to-token table."""
