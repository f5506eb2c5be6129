"""Executor — runs inside every rank process: the model runner (forward entry, gather plan,
attention metadata), the forward batch, sampling parameters and the sampler."""
