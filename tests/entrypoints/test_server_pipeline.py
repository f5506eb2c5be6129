"""Pipeline stages through `serve` (issue 27), with the official `openai` client: completions at
--pp-size 2 equal --pp-size 1 (n = 2 greedy choices, logprobs, streaming, chat), and /metrics
counts the output messages the pipeline sent and skipped (a long prompt's middle chunks)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import MODEL, _m, _metrics, _rank, _stream_texts, serving

from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.metrics import ServerMetrics
from dpattn.messages import StepStats
from dpattn.models.tiny import make_tiny_model

CHUNK = 8
PROMPT = "Once upon a time, in a land far away, there lived a curious fox. " * 3
PP_SERIES = "dpattn_pp_output_messages_total"


@pytest.fixture(scope="module")
def moe4(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("serve-pp") / "moe4"
    return str(make_tiny_model("qwen3_moe", out, seed=1, num_hidden_layers=4, mlp_only_layers=[0]))


def exchange(client: openai.OpenAI) -> dict[str, Any]:
    """The same requests on any layout, and what /metrics reads after them."""
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True})
    both = client.completions.create(**kw, n=2, logprobs=2, extra_body={"ignore_eos": True})
    stream = client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    texts, _, _ = _stream_texts(stream)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    return {
        "prompt_tokens": plain.usage.prompt_tokens,
        "text": plain.choices[0].text,
        "choices": [c.text for c in both.choices],
        "tokens": [c.logprobs.tokens for c in both.choices],
        "logprobs": [c.logprobs.token_logprobs for c in both.choices],
        "top": [[sorted(t) for t in c.logprobs.top_logprobs] for c in both.choices],
        "stream": texts[0],
        "chat": chat.choices[0].message.content,
    }


Run = tuple[dict[str, Any], dict[Any, float]]  # exchange's answers, then /metrics


def serve(model: str, pp: int) -> Run:
    engine = Engine(model, 1, 1, backend="thread", pp_size=pp, chunked_prefill_size=CHUNK)
    with serving(
        engine, model_name=MODEL
    ) as srv:  # and at the end: nothing in flight, no KV slot leaked
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert client.models.retrieve(MODEL).model_extra["pp_size"] == pp
        return exchange(client), _metrics(srv.url)


@pytest.fixture(scope="module")
def runs(moe4: str) -> dict[int, Run]:
    return {pp: serve(moe4, pp) for pp in (1, 2)}


def test_served_pipeline_equals_one_stage(
    runs: dict[int, Run],
) -> None:
    (want, _), (got, _) = runs[1], runs[2]
    assert want["prompt_tokens"] >= 4 * CHUNK  # at least 4 chunks
    assert got["choices"][0] == got["choices"][1] == want["text"]  # greedy: n equal choices
    for key in ("text", "choices", "tokens", "top", "stream", "chat"):
        assert got[key] == want[key], key
    for g, w in zip(got["logprobs"], want["logprobs"]):
        assert g == pytest.approx(w, abs=1e-4)


def test_metrics_count_sent_and_skipped_output_messages(
    runs: dict[int, Run],
) -> None:
    _, metrics = runs[2]
    sent = _m(metrics, PP_SERIES, **_rank(0, result="sent"))
    skipped = _m(metrics, PP_SERIES, **_rank(0, result="skipped"))
    assert sent > 0 and skipped > 0, (sent, skipped)
    # every request's prompt has at least 4 chunks, so 3 middle ones at least skip their message
    assert skipped >= 3
    _, flat = runs[1]
    assert not any(name == PP_SERIES for name, _ in flat), "pp 1 has no pipeline series"


def test_metrics_take_the_increase_of_cumulative_counts() -> None:
    """The ranks report counts since start; a step without a forward still carries them."""
    m = ServerMetrics(dp_size=2, pp_size=2)
    for d, sent, skipped, mode in [(0, 3, 2, "extend"), (1, 1, 0, "decode"), (0, 5, 2, "none")]:
        m.on_step(
            d, StepStats(forward_mode=mode, pp_outputs_sent=sent, pp_outputs_skipped=skipped), 0
        )
    m.on_step(0, StepStats(pp_outputs_sent=4, pp_outputs_skipped=2), 0)  # never backwards
    got = {
        (name, dict(labels)["dp_rank"], dict(labels)["result"]): value
        for (name, labels), value in _parse(m.render().decode()).items()
        if name == PP_SERIES
    }
    assert got == {
        (PP_SERIES, "0", "sent"): 5,
        (PP_SERIES, "0", "skipped"): 2,
        (PP_SERIES, "1", "sent"): 1,
        (PP_SERIES, "1", "skipped"): 0,
    }
    flat = ServerMetrics(dp_size=1).render().decode()
    assert "pp_output_messages" not in flat  # pp 1: no pipeline series at all


def _parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
