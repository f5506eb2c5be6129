"""Tools — run from the CLI in the frontend process: offline and online benchmarks and the
layout verifier (compares every layout's logits with Hugging Face transformers)."""
