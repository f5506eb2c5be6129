"""Sampling parameters, with the names users know from the large engines, validated here.

Every rank of a DP group holds the same full-vocab logits, and every request carries its own
seeded generator (the frontend picks a seed for unseeded requests), so all ranks of a group
draw the same tokens without exchanging them (executor/sampler.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MAX_SEED = 2**63  # torch generators take 64-bit seeds; the frontend draws 63-bit ones
GREEDY_TEMPERATURE = 1e-5
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    # Added to the token's logit before sampling (OpenAI's logit_bias, -100..100); the
    # returned logprobs stay those of the model's own distribution.
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Detokenization (the frontend's; ranks ignore it): drop special tokens from the text.
    skip_special_tokens: bool = True
    # Constrained decoding (SGLang's names; at most one): every output token is masked by the
    # grammar, and the request stops when the grammar is complete (executor/grammar.py).
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be a dict, not {type(d).__name__}")
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(names)}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        params = cls(**d)
        params.validate()
        return params

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        # bool is an int subclass, and NaN / inf pass every comparison that matters here: both
        # would slip through as "numbers" and sample nonsense instead of failing the request.
        def integer(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def number(x: Any) -> bool:
            return (integer(x) or isinstance(x, float)) and math.isfinite(x)

        need(
            integer(self.max_new_tokens) and self.max_new_tokens >= 0,
            "max_new_tokens must be an integer >= 1 (or 0 to score a prompt's logprobs only)",
        )
        need(number(self.temperature) and self.temperature >= 0, "temperature must be >= 0")
        need(number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(
            integer(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
            "top_k must be -1 or >= 1",
        )
        need(number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        need(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop must be non-empty strings",
        )
        need(
            isinstance(self.stop_token_ids, list) and all(integer(t) for t in self.stop_token_ids),
            "stop_token_ids must be a list of integers",
        )
        need(
            isinstance(self.logit_bias, dict)
            and all(
                integer(t) and number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()
            ),
            "logit_bias must map token ids to numbers in [-100, 100]",
        )
        need(isinstance(self.ignore_eos, bool), "ignore_eos must be true or false")
        need(
            isinstance(self.skip_special_tokens, bool), "skip_special_tokens must be true or false"
        )
        need(
            self.seed is None or (integer(self.seed) and 0 <= self.seed < MAX_SEED),
            "seed must be an integer in [0, 2**63)",
        )
        grammars = {k: getattr(self, k) for k in GRAMMAR_KINDS if getattr(self, k) is not None}
        need(
            all(isinstance(v, str) and v for v in grammars.values()),
            "json_schema, regex and ebnf must be non-empty strings",
        )
        need(
            len(grammars) <= 1,
            f"give at most one of json_schema, regex, ebnf (got {sorted(grammars)})",
        )

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the request's grammar, or None: the key grammars are cached by."""
        for kind in GRAMMAR_KINDS:
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None

    @property
    def greedy(self) -> bool:
        # A temperature this small would overflow logits / T to inf (NaN probabilities): it
        # means greedy anyway.
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
