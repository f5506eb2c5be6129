"""The prefix cache seen from the API (issue 15): cached_tokens in OpenAI usage and in
/generate's meta_info, the Prometheus counter per dp_rank, POST /flush_cache."""

from __future__ import annotations

from typing import Any

import httpx
import openai
from server_harness import MODEL, ServerThread, _m, _metrics, _rank

SYSTEM = "You are a helpful assistant who answers briefly and precisely. " * 4


def _complete(client: openai.OpenAI, question: str) -> Any:
    return client.completions.create(
        model=MODEL,
        prompt=SYSTEM + question,
        max_tokens=8,
        temperature=0,
        extra_body={"dp_rank": 1, "ignore_eos": True},  # one DP group holds the prefix
    )


def test_a_shared_prompt_prefix_is_served_from_the_cache(
    server: ServerThread, client: openai.OpenAI
) -> None:
    httpx.post(server.url + "/flush_cache").raise_for_status()
    before = _metrics(server.url)
    first = _complete(client, "What is the capital of France?")
    again = _complete(client, "What is the capital of France?")
    other = _complete(client, "Name a prime number.")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The same prompt: everything but its last token; another question: the shared system part.
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens
    assert again.choices[0].text == first.choices[0].text  # greedy: the cache changes nothing
    after = _metrics(server.url)
    name = "dpattn_cached_tokens_total"
    hit = _m(after, name, **_rank(1)) - before.get((name, tuple(sorted(_rank(1).items()))), 0)
    assert hit == (
        again.usage.prompt_tokens_details.cached_tokens
        + other.usage.prompt_tokens_details.cached_tokens
    )


def test_flush_cache_empties_it(server: ServerThread, client: openai.OpenAI) -> None:
    _complete(client, "Flush me.")
    assert _complete(client, "Flush me.").usage.prompt_tokens_details.cached_tokens > 0
    r = httpx.post(server.url + "/flush_cache")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert _complete(client, "Flush me.").usage.prompt_tokens_details.cached_tokens == 0


def test_generate_meta_info_and_copies_of_a_prompt_share_it(server: ServerThread) -> None:
    httpx.post(server.url + "/flush_cache").raise_for_status()
    body = {
        "text": [SYSTEM + "Count to three."] * 3,  # as n = 3 choices of one prompt are sent
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
    }
    out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    metas = [o["meta_info"] for o in out]
    assert len({m["dp_rank"] for m in metas}) == 1  # copies of a prompt: one DP group
    # The first choice computed the prompt; the others waited a step and found it cached.
    assert sorted(m["cached_tokens"] for m in metas) == [0] + [metas[0]["prompt_tokens"] - 1] * 2
    assert len({tuple(o["output_ids"]) for o in out}) == 1  # greedy choices are equal
