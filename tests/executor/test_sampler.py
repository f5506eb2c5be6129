"""The batched sampler against the per-request reference (reference_sampling.py): per-row
masks and distributions, empirical draws, seeds independent of batch-mates, logprobs, top-N."""

from __future__ import annotations

from unittest import mock

import pytest
import reference_sampling as R
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpattn.executor.sampler as S
from dpattn.executor.sampling_params import SamplingParams

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Small tensors: on a busy 2-core box, intra-op thread hand-offs cost more than the work.
torch.set_num_threads(1)


# ---- helpers ----


def ref_distribution(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The exact normalised vector the reference hands to torch.multinomial."""
    if params.greedy:
        out = torch.zeros_like(row)
        out[int(row.argmax())] = 1.0
        return out
    seen: list[torch.Tensor] = []

    def capture(p: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        seen.append(p.clone())
        return torch.zeros(1, dtype=torch.long)

    with mock.patch.object(R.torch, "multinomial", side_effect=capture):
        R.sample(row, params, torch.Generator().manual_seed(0))
    assert len(seen) == 1
    return seen[0]


def build(
    params: list[SamplingParams],
    seeds: list[int] | None = None,
    return_logprob: list[bool] | None = None,
    top_n: list[int] | None = None,
) -> S.SamplingBatchInfo:
    b = len(params)
    seeds = seeds if seeds is not None else list(range(b))
    return S.SamplingBatchInfo.from_params(
        params,
        [torch.Generator().manual_seed(s) for s in seeds],
        return_logprob if return_logprob is not None else [False] * b,
        top_n if top_n is not None else [0] * b,
    )


@st.composite
def row_params(draw: st.DrawFn, vocab: int) -> SamplingParams:
    p = SamplingParams(
        temperature=draw(st.one_of(st.just(0.0), st.floats(0.05, 3.0))),
        top_k=draw(st.one_of(st.just(-1), st.integers(1, vocab + 3))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0, exclude_min=True))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
    )
    p.validate()
    return p


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingParams]]:
    b, v = draw(st.integers(1, 6)), draw(st.integers(2, 64))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 20.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(b, v, generator=gen) * scale
    return logits, [draw(row_params(v)) for _ in range(b)]


# ---- (a) greedy ----


@SETTINGS
@given(batches(), st.data())
def test_greedy_rows_are_argmax(batch: tuple[torch.Tensor, list[SamplingParams]], data) -> None:
    logits, params = batch
    info = build(
        params,
        return_logprob=data.draw(
            st.lists(st.booleans(), min_size=len(params), max_size=len(params))
        ),
    )
    ids = S.sample(logits, info).next_token_ids
    for i, p in enumerate(params):
        if p.greedy:
            assert int(ids[i]) == int(logits[i].argmax()) == R.sample(logits[i], p, None)


def test_all_greedy_fast_path_is_argmax_without_softmax() -> None:
    logits = torch.randn(5, 100)
    info = build(
        [SamplingParams(temperature=0), SamplingParams(top_k=1)] * 2
        + [SamplingParams(temperature=0.0, top_p=0.5)]
    )
    assert info.all_greedy
    states = [g.get_state() for g in info.generators]
    with mock.patch.object(S.torch, "softmax", side_effect=AssertionError("softmax called")):
        out = S.sample(logits, info)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None
    # Greedy rows never advance their generator (as in the reference).
    assert all(torch.equal(s, g.get_state()) for s, g in zip(states, info.generators))


# ---- (b) masks and distributions ----


@SETTINGS
@given(batches())
def test_distribution_and_mask_match_reference(
    batch: tuple[torch.Tensor, list[SamplingParams]],
) -> None:
    logits, params = batch
    got = S.probs(logits, build(params))
    for i, p in enumerate(params):
        want = ref_distribution(logits[i], p)
        assert torch.equal(got[i] > 0, want > 0), (i, p)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-7)


def test_top_p_just_below_one_cuts_like_reference() -> None:
    # 1 - 2**-53 rounds to 1.0 in fp32, yet the reference still applies top-p (decided on the
    # Python value), cutting tail tokens where the fp32 cumsum overshoots 1. Found by hypothesis.
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(5)) * 4
    kept = []
    for top_p in (0.9999999999999999, 1.0):
        p = SamplingParams(top_p=top_p)
        got, want = S.probs(logits, build([p]))[0], ref_distribution(logits[0], p)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        kept.append(int((got > 0).sum()))
    assert kept == [18, 20]


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.floats(0.0, 0.9))
def test_top_k_ties_kept_like_reference(seed: int, k: int, min_p: float) -> None:
    # Coarsely rounded logits have many exact ties around the k-th value.
    logits = torch.round(torch.randn(3, 24, generator=torch.Generator().manual_seed(seed)))
    params = [
        SamplingParams(top_k=k, min_p=min_p),
        SamplingParams(top_k=k, temperature=0.5),
        SamplingParams(temperature=2.0, min_p=min_p),
    ]
    got = S.probs(logits, build(params))
    for i, p in enumerate(params):
        want = ref_distribution(logits[i], p)
        assert torch.equal(got[i] > 0, want > 0)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-7)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.99), st.integers(-1, 30))
def test_top_p_ties_same_mass_as_reference_lowest_ids_kept(seed: int, top_p: float, k: int) -> None:
    # With exact ties at the top-p cut the reference keeps whichever tied tokens its sort put
    # first; we keep the lowest token ids (stable sort). Same multiset of kept probabilities.
    logits = torch.round(torch.randn(2, 40, generator=torch.Generator().manual_seed(seed)))
    params = [SamplingParams(top_p=top_p, top_k=max(k, 1) if k > 1 else -1)] * 2
    got = S.probs(logits, build(params))
    for i, p in enumerate(params):
        want = ref_distribution(logits[i], p)
        torch.testing.assert_close(got[i].sort().values, want.sort().values, rtol=1e-5, atol=1e-7)
        kept = got[i] > 0
        for value in logits[i][kept & ~(want > 0)].unique():  # tie groups cut differently
            tied = (logits[i] == value).nonzero().squeeze(1)
            n = int(kept[tied].sum())
            assert bool(kept[tied[:n]].all()) and not bool(kept[tied[n:]].any())


@pytest.mark.parametrize("v", [7, 512, 1000, 1537])
def test_inverse_cdf_draw_is_exact_on_a_uniform_grid(v: int) -> None:
    # On a stratified grid of u, tokens <= i are hit n * cdf[i] times, +-1: checks the two-level
    # search (block boundaries, the padded last block, masked columns) exactly.
    g = torch.Generator().manual_seed(v)
    p = torch.softmax(torch.randn(v, generator=g) * 2, -1)
    p[torch.rand(v, generator=g) < 0.3] = 0  # masked columns
    p[-1] = 0.01  # mass in the (padded) last block
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 1) / n  # (0, 1]
    cols = S._draw(p.expand(n, v).contiguous(), u)
    counts = torch.bincount(cols, minlength=v).double()
    assert counts.numel() == v and bool((counts[p == 0] == 0).all())
    cdf = (p.double() / p.double().sum()).cumsum(0) * n
    assert float((counts.cumsum(0) - cdf).abs().max()) <= 1.0 + 1e-6


def test_masked_tokens_never_drawn_at_uniform_extremes() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(top_p=0.5),
        SamplingParams(top_k=3),
        SamplingParams(min_p=0.3),
        SamplingParams(temperature=0.7),
    ]
    info = build(params)
    mask = S.probs(logits, info) > 0
    smallest = torch.nextafter(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0))
    for u in (torch.ones(4, dtype=torch.float64), smallest.expand(4).clone()):
        with mock.patch.object(S, "_uniforms", return_value=u):
            ids = S.sample(logits, info).next_token_ids
        assert bool(mask[torch.arange(4), ids].all())


# ---- (c) empirical ----

# chi-square critical values at alpha = 1e-3, by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def test_empirical_distribution_matches_reference() -> None:
    # 4000 draws per parameter set: 100 requests (own seeds) x 40 steps each (generator
    # advancing), so both "across seeds" and "along one generator" are exercised cheaply.
    v, reqs, steps = 8, 100, 40
    draws = reqs * steps
    logits = torch.randn(5, v, generator=torch.Generator().manual_seed(3)) * 1.5
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(top_k=4, temperature=1.3),
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=0.0),
    ]
    info = build([p for p in params for _ in range(reqs)], seeds=list(range(5 * reqs)))
    batch = logits.repeat_interleave(reqs, dim=0)
    counts = torch.zeros(5, v)
    for _ in range(steps):
        ids = S.sample(batch, info).next_token_ids.view(5, reqs)
        counts += torch.nn.functional.one_hot(ids, v).sum(1)
    for i, p in enumerate(params):
        want = ref_distribution(logits[i], p)
        assert bool((counts[i][want == 0] == 0).all()), "drew a masked token"
        keep = want > 0
        if int(keep.sum()) == 1:
            assert counts[i][keep].item() == draws
            continue
        expected = want[keep] * draws
        chi2 = float(((counts[i][keep] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_999[int(keep.sum()) - 1], (i, chi2, counts[i], want)


# ---- (d) seeded reproducibility ----


def _run(steps: list[torch.Tensor], params: list[SamplingParams], seeds: list[int]) -> torch.Tensor:
    info = build(params, seeds)  # generators created once, advanced at each step
    return torch.stack([S.sample(x, info).next_token_ids for x in steps])


@settings(SETTINGS, max_examples=20)
@given(st.integers(0, 2**31 - 1), st.integers(0, 5), st.integers(0, 2**20))
def test_seeded_tokens_independent_of_batch(data_seed: int, pos: int, seed: int) -> None:
    g = torch.Generator().manual_seed(data_seed)
    v, n_steps, b = 300, 6, 6
    mine = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.01)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2),
        SamplingParams(top_p=0.3),
        SamplingParams(top_k=1),
        SamplingParams(min_p=0.5),
    ]
    full = [torch.randn(b, v, generator=g) * 3 for _ in range(n_steps)]
    alone = _run([x[pos : pos + 1] for x in full], [mine], [seed])[:, 0]
    assert torch.equal(alone, _run([x[pos : pos + 1] for x in full], [mine], [seed])[:, 0])
    params = others[:pos] + [mine] + others[pos:]
    seeds = [seed + 1 + i for i in range(b)]
    seeds[pos] = seed
    assert torch.equal(alone, _run(full, params, seeds)[:, pos])


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = [torch.randn(1, 1000, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    p = [SamplingParams(temperature=1.5)]
    a, b, c = _run(logits, p, [7]), _run(logits, p, [7]), _run(logits, p, [8])
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- (e) logprobs ----


@SETTINGS
@given(batches(), st.data())
def test_logprobs_and_top_logprobs(batch: tuple[torch.Tensor, list[SamplingParams]], data) -> None:
    logits, params = batch
    b, v = logits.shape
    want = data.draw(st.lists(st.booleans(), min_size=b, max_size=b))
    top_n = [data.draw(st.integers(0, min(20, v))) if w else 0 for w in want]
    info = build(params, return_logprob=want, top_n=top_n)
    shapes: list[tuple[int, ...]] = []
    real = torch.log_softmax

    def spy(x: torch.Tensor, dim: int) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return real(x, dim)

    with mock.patch.object(S.torch, "log_softmax", side_effect=spy):
        out = S.sample(logits, info)
    if not any(want):
        assert out.logprobs is None and out.top_logprobs is None and not shapes
        return
    assert shapes == [(sum(want), v)]  # one log_softmax, over the asking rows only
    assert out.logprobs is not None
    for i in range(b):
        lsm = torch.log_softmax(logits[i], -1)
        tok = int(out.next_token_ids[i])
        if want[i]:
            assert out.logprobs[i].item() == pytest.approx(lsm[tok].item(), abs=1e-6)
        else:
            assert torch.isnan(out.logprobs[i])
    if max(top_n) == 0:
        assert out.top_logprobs is None
        return
    assert out.top_logprobs is not None
    vals, ids = out.top_logprobs
    assert vals.shape == ids.shape == (b, max(top_n))
    for i in range(b):
        n = top_n[i]
        ref_v, ref_i = torch.topk(torch.log_softmax(logits[i], -1), n) if n else (None, None)
        if n:
            torch.testing.assert_close(vals[i, :n], ref_v, rtol=0, atol=1e-6)
            assert torch.equal(ids[i, :n], ref_i)
        assert torch.isnan(vals[i, n:]).all() and (ids[i, n:] == -1).all()


def test_logprob_of_sampled_not_greedy_token_uses_unmodified_distribution() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))
    info = build([SamplingParams(temperature=0.3, top_k=2)] * 2, return_logprob=[True, True])
    out = S.sample(logits, info)
    assert out.logprobs is not None
    ref = torch.log_softmax(logits, -1).gather(1, out.next_token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, ref)


# ---- validation ----


@pytest.mark.parametrize(
    ("want", "n"), [([True], [21]), ([True], [-1]), ([False], [3]), ([True, True], [1])]
)
def test_from_params_rejects_bad_logprob_requests(want: list[bool], n: list[int]) -> None:
    with pytest.raises(ValueError):
        S.SamplingBatchInfo.from_params([SamplingParams()], [torch.Generator()], want, n)


def test_rejects_wrong_logits_shape() -> None:
    with pytest.raises(ValueError):
        S.sample(torch.randn(3, 10), build([SamplingParams()] * 2))


def test_logit_bias_moves_the_draw_not_the_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    params = [
        SamplingParams(temperature=0, logit_bias={3: 100.0}),  # greedy follows the bias
        SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0}),  # 0, 1 never drawn
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    info = S.SamplingBatchInfo.from_params(params, gens, [True, True], [0, 0])
    for _ in range(20):
        out = S.sample(logits, info)
        assert int(out.next_token_ids[0]) == 3 and int(out.next_token_ids[1]) in (2, 3)
        lsm = torch.log_softmax(logits, -1)  # logprobs: the model's own distribution
        want = lsm.gather(1, out.next_token_ids[:, None]).squeeze(1)
        assert torch.allclose(out.logprobs, want)
    assert S.probs(logits, info)[1, :2].sum() < 1e-30


@pytest.mark.parametrize("vocab", [100, 4096, 262144, 5000 + 17])
def test_argmax_rows_is_argmax(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=gen)
    x[1, :] = 0.0  # all tied: the first column
    x[2, -1] = 100.0  # the very last column (a short tail chunk when vocab % 1024)
    x[3, [7, vocab - 3]] = 50.0  # a tie across chunks: the first one
    x[4, [1030 % vocab, 1031 % vocab]] = 60.0  # a tie inside a chunk
    x[5] = x[5].round()  # many ties
    assert torch.equal(S.argmax_rows(x), x.argmax(-1))
