"""Engine.generate with SGLang's logprob options: prompt and output logprobs in meta_info."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpattn.entrypoints.engine import Engine
from dpattn.tools.verify import reference_logits


def test_generate_returns_prompt_and_output_logprobs(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])
    prompt = [5, 9, 200, 31, 77, 8]
    with Engine(model, 2, 1, backend="thread", chunked_prefill_size=4) as engine:
        out = engine.generate(
            input_ids=prompt,
            sampling_params={"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=2,
        )
        for bad in ({"logprob_start_len": 6}, {"top_logprobs_num": 21}):
            with pytest.raises(ValueError):
                engine.generate(input_ids=prompt, return_logprob=True, **bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="need return_logprob"):
            engine.generate(input_ids=prompt, top_logprobs_num=2)
    meta = out["meta_info"]  # type: ignore[call-overload]
    seq = prompt + out["output_ids"][:1]  # type: ignore[call-overload]
    lsm = torch.log_softmax(reference_logits(model, "float32", {0: seq})[0], dim=-1)
    first, *rest = meta["input_token_logprobs"]
    assert first == (None, prompt[0])
    assert [t for _, t in rest] == prompt[1:]
    assert [lp for lp, _ in rest] == pytest.approx(
        [float(lsm[p - 1, prompt[p]]) for p in range(1, len(prompt))], abs=1e-4
    )
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(prompt)
    assert [t for _, t in meta["input_top_logprobs"][1]] == lsm[0].topk(2).indices.tolist()
    out_lp, out_id = meta["output_token_logprobs"][0]
    assert out_id == out["output_ids"][0]  # type: ignore[call-overload]
    assert out_lp == pytest.approx(float(lsm[len(prompt) - 1, out_id]), abs=1e-4)
    assert len(meta["output_top_logprobs"]) == 2
