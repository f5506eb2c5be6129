"""Models — inside every rank: one module per architecture family (llama, gemma3), the registry
that maps a HF config to one, the checkpoint loader, GGUF conversion and tiny checkpoints."""
