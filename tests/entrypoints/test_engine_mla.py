"""MLA models (DeepSeek V2 / V3, issue 24) through `Engine`: greedy tokens and logprobs equal
transformers' (fp32, a greedy loop over the full forward) at (1, 1) and (4, 4), with the prefix
cache on and off, through chunked prefill and through retraction; and prefill + decode attending
absorbed give the tokens and logprobs of both attending decompressed.

One engine run covers every property: a prompt, then one sharing its first SYSTEM tokens (the
prefix cache is hit, prompt logprobs asked from past the shared part), then three requests per
DP group on a KV pool too small for them to decode together (retraction); prompts are longer
than the prefill chunk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from server_harness import _wait_for

from dpattn.entrypoints.engine import Engine

SYSTEM = list(range(40, 60))  # 20 tokens shared by "a" and "b"
PROMPTS = {
    "a": SYSTEM + [5, 6, 7],
    "b": SYSTEM + [9, 9, 4],
    "r0": [300 + i for i in range(12)],
    "r1": [7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47],
    "r2": [201, 5, 201, 6, 201, 7, 201, 8, 201, 9, 201, 10],
}
RETRACT = ["r0", "r1", "r2"]  # each DP group gets all three at once
NEW = 6
CHUNK = 8  # every prompt is split
# A group's three retraction requests (12 prompt + NEW each) do not fit together; "a" does.
POOL = 40
B_LOGPROBS_FROM = len(SYSTEM)  # "b"'s prompt logprobs: its own tail (the cache serves the rest)
LOGPROB_ATOL = 1e-4  # as tests/entrypoints/test_engine_logprobs.py
FORMS_ATOL = 1e-5  # absorbed against decompressed, both fp32
# Logits within verify's fp32 bound (1e-4) of the reference cannot flip a greedy step whose
# top-2 gap is above twice that: below it the prompt would test the tie, not the model.
MIN_MARGIN = 2e-4


@dataclass(frozen=True)
class Reference:
    ids: list[int]
    logprobs: list[float]  # of each chosen token
    prompt_logprobs: list[float]  # of prompt token p given tokens < p, p = 1, 2, ...
    margin: float  # the smallest top-1 minus top-2 logit gap of the greedy steps


@functools.cache
def _hf_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def references(path: str) -> dict[str, Reference]:
    """transformers' greedy continuation of every prompt: one full forward per new token, the
    prompts of one length in one batch (no padding, so no attention mask)."""
    model = _hf_model(path)
    refs = {}
    for length in sorted({len(p) for p in PROMPTS.values()}):
        keys = [k for k, p in PROMPTS.items() if len(p) == length]
        seqs = torch.tensor([PROMPTS[k] for k in keys])
        steps = []
        with torch.inference_mode():
            for _ in range(NEW):
                logits = model(seqs).logits.float()
                steps.append(logits)
                seqs = torch.cat([seqs, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        for i, key in enumerate(keys):
            prompt_lsm = torch.log_softmax(steps[0][i], dim=-1)
            last = torch.stack([s[i, -1] for s in steps])  # [NEW, vocab]
            lsm, top2 = torch.log_softmax(last, dim=-1), last.topk(2).values
            ids = seqs[i, length:]
            refs[key] = Reference(
                ids.tolist(),
                lsm.gather(1, ids[:, None])[:, 0].tolist(),
                [float(prompt_lsm[p - 1, PROMPTS[key][p]]) for p in range(1, length)],
                float((top2[:, 0] - top2[:, 1]).min()),
            )
    return refs


@dataclass
class Run:
    outs: list[tuple[str, dict[str, Any]]]  # (prompt key, Engine.generate's output)
    retractions: list[int]  # per DP group
    stats_retractions: list[int]  # the last StepStats.retractions of each group
    extend_tokens: list[int]  # tokens of every extend step of every group


def run_engine(model: Path, tp: int, dp: int, cache: bool = True, **options: Any) -> Run:
    greedy = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
    with Engine(
        str(model),
        tp,
        dp,
        backend="thread",
        chunked_prefill_size=CHUNK,
        kv_pool_tokens=POOL,
        disable_radix_cache=not cache,
        **options,
    ) as engine:
        assert engine.kv_total == [POOL] * dp
        group = dp - 1  # the prefix pair runs in the last group (not only group 0)
        outs: list[tuple[str, dict[str, Any]]] = []
        for key, start in (("a", -1), ("b", B_LOGPROBS_FROM)):  # "b" after "a" finished
            out = engine.generate(
                input_ids=PROMPTS[key],
                sampling_params=greedy,
                return_logprob=True,
                logprob_start_len=start,
                dp_rank=group,
            )
            outs.append((key, out))  # type: ignore[arg-type]
        keys = RETRACT * dp
        batch = engine.generate(
            input_ids=[PROMPTS[k] for k in keys],
            sampling_params=greedy,
            return_logprob=True,
            dp_rank=[i // len(RETRACT) for i in range(len(keys))],
        )
        outs += zip(keys, batch)  # type: ignore[arg-type]
        assert _wait_for(engine.kv_pools_full), "KV slots leaked"
        last: dict[int, int] = {}
        extend_tokens = []
        for d, stats in list(engine.step_stats):
            last[d] = stats.retractions
            if stats.forward_mode == "extend":
                extend_tokens.append(stats.num_tokens)
        run = Run(outs, list(engine.retractions), [last[d] for d in range(dp)], extend_tokens)
    return run


def check_against_reference(model: Path, run: Run, cache: bool) -> None:
    for key, out in run.outs:
        ref = references(str(model))[key]
        assert ref.margin > MIN_MARGIN, f"{key}: a near tie in the reference; pick another prompt"
        meta = out["meta_info"]
        assert meta["finish_reason"] == "length"
        assert out["output_ids"] == ref.ids, key
        lps = [lp for lp, _ in meta["output_token_logprobs"]]
        assert [t for _, t in meta["output_token_logprobs"]] == ref.ids
        assert lps == pytest.approx(ref.logprobs, abs=LOGPROB_ATOL), key
        if key == "b":
            got = [lp for lp, _ in meta["input_token_logprobs"]]
            want = ref.prompt_logprobs[B_LOGPROBS_FROM - 1 :]
            assert len(got) == len(PROMPTS["b"]) - B_LOGPROBS_FROM
            assert got == pytest.approx(want, abs=LOGPROB_ATOL)
            # The cache serves the shared SYSTEM up to where the prompt logprobs start.
            assert meta["cached_tokens"] == (B_LOGPROBS_FROM - 1 if cache else 0)
        elif key == "a":
            assert meta["cached_tokens"] == 0
    assert all(run.retractions), f"a DP group retracted nothing: {run.retractions}"
    assert run.stats_retractions == run.retractions
    assert max(run.extend_tokens) <= CHUNK < len(PROMPTS["a"])  # prompts were chunked


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("tp,dp", [(1, 1), (4, 4)])
def test_engine_matches_transformers(
    mla_models: dict[str, Path], tp: int, dp: int, cache: bool
) -> None:
    model = mla_models["deepseek_v3"]  # q-LoRA, YaRN, sigmoid routing + correction bias
    check_against_reference(model, run_engine(model, tp, dp, cache), cache)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3_noq"])
def test_other_mla_models_match_transformers(mla_models: dict[str, Path], arch: str) -> None:
    """V2 (softmax group-limited routing, no YaRN) and V3 with a plain q_proj."""
    model = mla_models[arch]
    check_against_reference(model, run_engine(model, 1, 1), True)


def test_absorbed_prefill_equals_decompressed(mla_models: dict[str, Path]) -> None:
    """mla_mode absorbed (every step over the latent) against decompressed (every step over
    per-head K/V), at attention TP 2 (the heads split): the same tokens, logprobs within fp32
    rounding, and both equal to transformers."""
    model = mla_models["deepseek_v3"]
    absorbed = run_engine(model, 2, 1, mla_mode="absorbed")
    decompressed = run_engine(model, 2, 1, mla_mode="decompressed")
    for run in (absorbed, decompressed):
        check_against_reference(model, run, True)
    assert [k for k, _ in absorbed.outs] == [k for k, _ in decompressed.outs]
    for (key, a), (_, d) in zip(absorbed.outs, decompressed.outs):
        assert a["output_ids"] == d["output_ids"], key
        lp_a = [lp for lp, _ in a["meta_info"]["output_token_logprobs"]]
        lp_d = [lp for lp, _ in d["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_d, abs=FORMS_ATOL), key
