"""Batched, seeded sampler: one vectorised pass over a step's [B, V] fp32 logits.

Filters (temperature, top-k, top-p, min-p) are per-row tensors applied in one pass, in the
order and with the comparisons of the per-request reference sampler kept in the tests, so each
row's candidate tokens and probabilities match it. The draw is an inverse-CDF lookup with one
uniform per row (see ``_draw``); exact ties at the top-p cut keep the lowest token ids (stable
sort). Logprobs come from one ``log_softmax`` over the rows that ask, top-N from one ``topk``.

Why every rank agrees: all attn-TP ranks of a DP group hold identical logits and identical
per-request generators, every op below is deterministic, and each row's result depends on that
row alone (checked on CPU by the tests), so they all pick the same token without communication
and a seeded request gets the same tokens whatever its batch-mates are.

The batch's state (filters, row lists) is built once per step: sampling_batch_info.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpattn.executor.sampling_batch_info import SamplingBatchInfo

_BLOCK = 512  # columns per block of the two-level inverse CDF (see _draw)


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [B] int64
    # [B] fp32, log_softmax(logits)[token]; NaN in rows that did not ask (never computed).
    logprobs: torch.Tensor | None
    # ([B, N] fp32, [B, N] int64), N = max top_logprobs_num; row i is valid in its first
    # top_logprobs_num[i] columns, the rest (and non-asking rows) are NaN / -1.
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


def _rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


def _filtered(
    logits: torch.Tensor, info: SamplingBatchInfo
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unnormalised, masked probabilities of the sampled rows, [R, V].

    Returns ``(p, order)``: with top-k or top-p in the batch, ``p`` is in descending-sorted order
    and ``order`` maps its columns back to token ids; otherwise ``p`` is in vocab order and
    ``order`` is None (a batch of plain temperature / min-p rows never pays for a sort).
    Filters are applied in the reference's order: top-k, top-p, min-p, to softmax(x / T).
    """
    f = info.filters
    assert f is not None, "no row samples"
    x = _rows(logits, info.sample_index)
    v = x.shape[-1]
    probs = torch.softmax(x / f.temperature.unsqueeze(1), dim=-1)
    min_p = f.min_p.unsqueeze(1) if info.need_min_p else None
    if not (info.need_top_k or info.need_top_p):
        if min_p is not None:
            probs.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), 0)
        return probs, None
    # The one sort for every filter. Stable: equal probabilities (common with bf16-born logits)
    # order by token id, so the top-p cut among ties is defined and does not depend on the
    # batch shape or the device's sort algorithm. The filters then work in place on it.
    sp, order = probs.sort(dim=-1, descending=True, stable=True)
    if info.need_top_k:
        # "off" rows: kth = smallest prob, drops none
        k = torch.where(f.top_k > 0, f.top_k.clamp(max=v), v)
        # Compare against the k-th value, not position: ties with it survive, as in the reference.
        kth = sp.gather(1, (k - 1).unsqueeze(1))
        sp.masked_fill_(sp < kth, 0)
    if info.need_top_p:
        top_p = f.top_p.unsqueeze(1)  # inf when off: drops nothing
        # Mass strictly before each token > top_p: keeps the smallest prefix reaching top_p.
        sp.masked_fill_(sp.cumsum(-1).sub_(sp) > top_p, 0)
    if min_p is not None:
        sp.masked_fill_(sp < min_p * sp[:, :1], 0)  # column 0 is the max, never dropped
    return sp, order


def probs(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """The normalised distribution each row is sampled from, [B, V] in vocab order.

    Greedy rows are one-hot at their argmax. For tests and debugging; ``sample`` never builds it.
    """
    if info.logit_bias is not None:
        logits = logits.index_put(info.logit_bias[:2], info.logit_bias[2], accumulate=True)
    out = torch.zeros_like(logits)
    if info.greedy_rows:
        g = torch.tensor(info.greedy_rows, dtype=torch.long, device=logits.device)
        out[g, logits[g].argmax(-1)] = 1.0
    if info.sample_rows:
        p, order = _filtered(logits, info)
        p = p / p.sum(-1, keepdim=True)
        if order is not None:
            p = torch.empty_like(p).scatter_(1, order, p)
        s = torch.tensor(info.sample_rows, dtype=torch.long, device=logits.device)
        out[s] = p
    return out


def _uniforms(info: SamplingBatchInfo, device: torch.device) -> torch.Tensor:
    # One fp64 uniform per sampled row from that row's own generator: a request's draw depends
    # only on its seed and step, never on its batch-mates. This Python loop (one tiny rand per
    # row) is the only per-request work in the sampler.
    gens = [info.generators[i] for i in info.sample_rows]
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g, device=g.device) for g in gens])
    return 1.0 - u.to(device)  # (0, 1]: see _draw for why zero must be excluded


def _draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: per row, the first column whose cumulative mass reaches u * total.

    Why inverse-CDF rather than multinomial or Gumbel noise: one uniform per row is all the
    randomness needed (cheap, and each row's draw comes from its own generator only), and it is
    exact over any masked distribution.

    Why two levels: a single fp32 cumsum over 262144 columns is too coarse (its step near 1.0 is
    6e-8, comparable to a tail token's probability) and an fp64 cumsum of the whole row costs
    far more than fp32 block sums (56 vs 3 ms for 16 x 262144 on CPU). So: fp32 sums of blocks
    of ``_BLOCK`` columns, an fp64 cumsum over the block sums to pick a block, then an fp64
    cumsum inside that one block. The only error left is the fp32 rounding of each block's sum
    (~1e-7 of its mass).

    No masked token can be chosen: u is in (0, 1], so each search target t satisfies
    0 < t <= cdf[-1], and the first column with cdf >= t has cdf[j-1] < t <= cdf[j], i.e. a
    positive mass; the same holds for the block, and for the residual inside it.
    """
    r, v = p.shape
    width = min(_BLOCK, v)
    pad = -v % width
    if pad:  # zero columns: never chosen, see above
        p = torch.nn.functional.pad(p, (0, pad))
    blocks = p.view(r, -1, width)
    block_cdf = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [R, C]
    target = (u * block_cdf[:, -1]).unsqueeze(1)  # in (0, total]
    b = torch.searchsorted(block_cdf, target)  # [R, 1]: first block reaching the target
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b.unsqueeze(2).expand(r, 1, width)).squeeze(1)
    inner_cdf = inner.to(torch.float64).cumsum(-1)  # [R, width]
    # target > before strictly, so the residual is > 0; cap it at the block's own fp64 total,
    # which can differ from the fp32 block sum by rounding.
    rest = torch.minimum(target - before, inner_cdf[:, -1:])
    return (b * width + torch.searchsorted(inner_cdf, rest)).squeeze(1)


def argmax_rows(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """x.argmax(-1) of [B, V] (the first maximum). On CPU argmax is a scalar loop, amax is
    vectorised: the max of each `chunk` columns, the first chunk holding the row's max, then
    argmax inside it (64 x 262144 fp32 on 2 cores: 9 ms -> ~2.5 ms, measured)."""
    b, v = x.shape
    if x.device.type != "cpu" or v < 4 * chunk:
        return x.argmax(-1)
    n = v - v % chunk
    maxes = x[:, :n].view(b, n // chunk, chunk).amax(-1)
    if n < v:
        maxes = torch.cat([maxes, x[:, n:].amax(-1, keepdim=True)], dim=1)
    j = maxes.argmax(-1)
    # the tail chunk is shorter: its missing columns repeat the last one, which argmax ignores
    cols = (j[:, None] * chunk + torch.arange(chunk)).clamp_(max=v - 1)
    return j * chunk + x.gather(1, cols).argmax(-1)


def sample(
    logits: torch.Tensor, info: SamplingBatchInfo, raw: torch.Tensor | None = None
) -> SampleOutput:
    """Sample one token per row of fp32 ``logits`` [B, V], plus logprobs where asked.

    ``raw``: the model's own logits when ``logits`` were masked by grammars (logprobs are the
    model's own distribution, mask or bias or not)."""
    if logits.dim() != 2 or logits.shape[0] != info.batch_size:
        raise ValueError(f"logits {tuple(logits.shape)} do not match batch of {info.batch_size}")
    dev = logits.device
    raw = logits if raw is None else raw
    if info.logit_bias is not None:
        logits = logits.index_put(info.logit_bias[:2], info.logit_bias[2], accumulate=True)
    if info.all_greedy:
        ids = argmax_rows(logits)  # fast path: no softmax, no generators touched
    else:
        ids = torch.empty(logits.shape[0], dtype=torch.long, device=dev)
        if info.greedy_rows:  # greedy rows never consume their generator, as in the reference
            ids.index_copy_(0, info.greedy_index, argmax_rows(_rows(logits, info.greedy_index)))
        p, order = _filtered(logits, info)
        col = _draw(p, _uniforms(info, dev))
        tok = col if order is None else order.gather(1, col.unsqueeze(1)).squeeze(1)
        if info.sample_index is None:
            ids = tok
        else:
            ids.index_copy_(0, info.sample_index, tok)
    if not info.logprob_rows:
        return SampleOutput(ids, None, None)

    # One log_softmax over only the rows that asked, under the unmodified distribution.
    lidx = info.logprob_index
    lsm = torch.log_softmax(_rows(raw, lidx), dim=-1)
    chosen = lsm.gather(1, _rows(ids, lidx).unsqueeze(1)).squeeze(1)
    if lidx is None:
        logprobs = chosen
    else:
        logprobs = torch.full((logits.shape[0],), torch.nan, dtype=lsm.dtype, device=dev)
        logprobs.index_copy_(0, lidx, chosen)
    n = info.max_top_logprobs_num
    if n == 0:
        return SampleOutput(ids, logprobs, None)
    vals, tids = lsm.topk(n, dim=-1)
    # Rows asking fewer than n columns: blank the surplus so nobody reads it by mistake.
    want = torch.tensor(
        [info.top_logprobs_num[i] for i in info.logprob_rows], dtype=torch.long, device=dev
    )
    surplus = torch.arange(n, device=dev).unsqueeze(0) >= want.unsqueeze(1)
    vals, tids = vals.masked_fill(surplus, torch.nan), tids.masked_fill(surplus, -1)
    if lidx is not None:
        b = logits.shape[0]
        vals = torch.full((b, n), torch.nan, dtype=lsm.dtype, device=dev).index_copy_(0, lidx, vals)
        tids = torch.full((b, n), -1, dtype=torch.long, device=dev).index_copy_(0, lidx, tids)
    return SampleOutput(ids, logprobs, (vals, tids))
