"""Layers — inside every rank: sharded building blocks (attention and its backend, the DP
gather / scatter, embedding, norms, rotary, MLP, MoE) and the forward context they read."""
