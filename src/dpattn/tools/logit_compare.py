"""How verify compares one layout's logits with the reference: three checks per logits row.

1. Magnitude-scaled bound: |Δ| ≤ atol + rtol · max|logit_ref|. The layout changes the order of
   partial sums, so rounding grows with the logits' size: a real model whose logits are in the
   tens (Gemma 3) differs by a few 1e-4 in fp32, a tiny random model (|logit| < 1) by ~1e-6.
   With |logit| < 1 the rtol term is below 1e-5, so the tiny models keep the absolute bound.
2. Greedy agreement: our argmax is the reference's, unless the reference's top two are within
   twice the bound of each other (a tie that rounding may break either way: with every logit
   within the bound, the two may each move by it, towards each other).
3. KL(p_ref ‖ p_ours) of the next-token distributions, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    max_kl: float


def default_tolerance(dtype: str) -> Tolerance:
    if dtype == "float32":
        # Gemma-3-270M at (1,1), (2,1), (2,2): |Δ| up to 1.7e-4 (5e-4 seen with more prompts)
        # on rows whose max|logit| is 16-60, i.e. <= ~1e-5 relative; KL ~1e-10. rtol 5e-5
        # leaves a margin of 2-5; a 1% change of one weight tensor is far outside.
        return Tolerance(atol=1e-4, rtol=5e-5, max_kl=1e-6)
    if dtype == "bfloat16-vs-float32":
        # bf16 arithmetic (the int4 kernel's activations and outputs) against an fp32 reference:
        # transformers' own bf16 Gemma 3 differs from its fp32 by up to 1/13 of a row's
        # max|logit| on verify's prompt lengths (measured); the kernels, bf16 in the
        # projections only, stay within twice the bf16-against-bf16 rtol.
        return Tolerance(atol=0.25, rtol=8 / 128, max_kl=5e-2)
    # bf16 keeps 8 significant bits: a ulp is |logit| / 128, and a few ulps of difference are
    # rounding, not a bug (atol 0.25 covers the small logits of the tiny models).
    return Tolerance(atol=0.25, rtol=4 / 128, max_kl=5e-2)


@dataclass
class RowCheck:
    """The three checks on one logits row (one request at one step)."""

    max_abs_diff: float
    bound: float
    greedy_agree: bool
    near_tie: bool
    kl: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound and (self.greedy_agree or self.near_tie)


def check_row(ours: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> RowCheck:
    ours, ref = ours.double(), ref.double()
    bound = tol.atol + tol.rtol * float(ref.abs().max())
    top2 = ref.topk(2).values if ref.numel() > 1 else ref.repeat(2)
    log_p, log_q = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))
    return RowCheck(
        max_abs_diff=float((ours - ref).abs().max()),
        bound=bound,
        greedy_agree=int(ours.argmax()) == int(ref.argmax()),
        near_tie=float(top2[0] - top2[1]) <= 2 * bound,
        kl=kl,
    )
