"""sglang-router (SGLang's Rust router, 0.3.2 from the package index) in front of `dpattn serve`.

Regular mode: two workers (tp2 dp2 and tp1, gloo rank processes on CPU, the tiny default model)
behind the router with `--policy cache_aware`, `--policy power_of_two` and `--dp-aware`; greedy
completions and chat answers through the router, with the official `openai` client, streaming
included, equal the workers' own. PD mode: `dpattn serve --disaggregation-mode prefill` and
`decode` behind `--pd-disaggregation --prefill URL [BOOTSTRAP_PORT] --decode URL` (once with the
bootstrap port, once without: `bootstrap_port: null` then means the configured
`--disaggregation-bootstrap-port`, which both servers are given) equal a colocated server, `n = 2`
and a prompt list included.

Opt-in (DPATTN_SGLANG_ROUTER_TESTS=1, a few minutes): pip installs the router from the package
index (sglang_router_harness.py) into a virtualenv of its own under the dpattn cache ($DPATTN_CACHE, ~/.cache/dpattn:
sglang-router-0.3.2, ~150 MB, about a minute the first time), kept between runs; it is never a
dependency of the suite. Everything listens on 127.0.0.1, request counts are bounded, and every
process started here is stopped at the end. Each test runs all its cases and then fails once,
listing every case that failed with the router's or the worker's answer."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_harness import MODEL, _stream_texts
from sglang_router_harness import (
    Checks,
    Servers,
    Unanswered,
    answer_of,
    router,
    router_python,
)

from dpattn.models.tiny import ensure_default_model

MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
CHATS = ["Hello, who are you?", "Name three colors."]

pytestmark = [
    pytest.mark.gloo,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        os.environ.get("DPATTN_SGLANG_ROUTER_TESTS") != "1",
        reason="installs sglang-router from the package index: DPATTN_SGLANG_ROUTER_TESTS=1",
    ),
]


# ---------------------------------------------------------------------------------------------
# Requests and their answers


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def _greedy() -> dict[str, Any]:
    return dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0)


def complete(client: openai.OpenAI, prompt: str | list[str], n: int = 1) -> list[str]:
    out = client.completions.create(prompt=prompt, n=n, **_greedy())
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


def complete_stream(client: openai.OpenAI, prompt: str | list[str], n: int = 1) -> list[str]:
    texts, reasons, _ = _stream_texts(
        client.completions.create(prompt=prompt, n=n, stream=True, **_greedy())
    )
    assert set(reasons) == set(texts), f"a choice without finish_reason: {reasons}"
    return [texts[i] for i in sorted(texts)]


def chat(client: openai.OpenAI, content: str, n: int = 1) -> list[str]:
    messages = [{"role": "user", "content": content}]
    out = client.chat.completions.create(messages=messages, n=n, **_greedy())  # type: ignore[arg-type]
    return [c.message.content or "" for c in sorted(out.choices, key=lambda c: c.index)]


def chat_stream(client: openai.OpenAI, content: str, n: int = 1) -> list[str]:
    messages = [{"role": "user", "content": content}]
    stream = client.chat.completions.create(messages=messages, n=n, stream=True, **_greedy())  # type: ignore[arg-type]
    texts, reasons, _ = _stream_texts(stream, chat=True)
    assert set(reasons) == set(texts), f"a choice without finish_reason: {reasons}"
    return [texts[i] for i in sorted(texts)]


def generate(url: str, prompt: str, stream: bool = False) -> str:
    """SGLang's native /generate: the text (streamed `text` is cumulative: the last chunk's)."""
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0},
        "stream": stream,
    }
    if not stream:
        r = httpx.post(url + "/generate", json=body, timeout=120)
        if r.status_code != 200:
            raise AssertionError(f"HTTP {r.status_code} {r.text[:600]}")
        return str(r.json()["text"])
    text = None
    with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            raise AssertionError(f"HTTP {r.status_code} {r.text[:600]}")
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                text = json.loads(line[5:])["text"]
    if text is None:
        raise AssertionError("no chunk")
    return text


def _reference(url: str) -> dict[str, Any]:
    """Every answer the tests compare, from one server directly (an Unanswered where it fails)."""
    c = _client(url)
    return {
        "complete": {p: answer_of(lambda p=p: complete(c, p)) for p in PROMPTS},
        "chat": {m: answer_of(lambda m=m: chat(c, m)) for m in CHATS},
        "generate": {p: answer_of(lambda p=p: generate(url, p)) for p in PROMPTS[:1]},
        "list": answer_of(lambda: complete(c, PROMPTS[:2])),
        "n2": answer_of(lambda: complete(c, PROMPTS[0], n=2)),
        "chat_n2": answer_of(lambda: chat(c, CHATS[0], n=2)),
    }


def _check_regular(checks: Checks, client: openai.OpenAI, url: str, ref: dict[str, Any]) -> None:
    """Completions and chat, streamed and not, twice over (the policy spreads them); /generate."""
    for rnd in range(2):
        for p in PROMPTS:
            want = ref["complete"][p]
            checks.equal(f"completion {p!r} #{rnd}", want, lambda p=p: complete(client, p))
            checks.equal(
                f"completion stream {p!r} #{rnd}", want, lambda p=p: complete_stream(client, p)
            )
        for m in CHATS:
            want = ref["chat"][m]
            checks.equal(f"chat {m!r} #{rnd}", want, lambda m=m: chat(client, m))
            checks.equal(f"chat stream {m!r} #{rnd}", want, lambda m=m: chat_stream(client, m))
    p = PROMPTS[0]
    want = ref["generate"][p]
    checks.equal(f"/generate {p!r}", want, lambda: generate(url, p))
    checks.equal(f"/generate stream {p!r}", want, lambda: generate(url, p, stream=True))


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def router_py() -> Path:
    return router_python()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The two regular workers (tp2 dp2, tp1) and the PD pair (prefill tp2 dp2 on a free
    bootstrap port, decode tp2 dp2), started together so that they load in parallel."""
    logs = tmp_path_factory.mktemp("sglang-router-logs")
    s = Servers(ensure_default_model(), logs)
    try:
        s.start("dp2", "--tp", "2", "--dp", "2")
        s.start("tp1", "--tp", "1")
        # A PD request that goes wrong fails after 30 s, not the default 60 s: the router retries
        # a 503 (up to 5 times), and the test has 14 such requests.
        boot = ["--disaggregation-bootstrap-port", str(s.bootstrap_port)]
        boot += ["--disaggregation-bootstrap-timeout", "30"]
        s.start("prefill", "--tp", "2", "--dp", "2", "--disaggregation-mode", "prefill", *boot)
        # The decode server is given the prefill's bootstrap port too: a `bootstrap_port: null`
        # from the router means "the configured one" on both servers, as in SGLang.
        s.start("decode", "--tp", "2", "--dp", "2", "--disaggregation-mode", "decode", *boot)
        s.wait()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def reference(servers: Servers) -> dict[str, Any]:
    """The answers of the tp1 worker directly: the colocated reference."""
    return _reference(servers.url["tp1"])


# ---------------------------------------------------------------------------------------------
# Tests


def test_workers_agree_directly(servers: Servers, reference: dict[str, Any]) -> None:
    """Without the router, the tp2 dp2 worker answers as the tp1 one (else the router's choice of
    worker would matter below), and every reference request is answered."""
    other = _reference(servers.url["dp2"])
    checks = Checks("dpattn workers directly (no router)")
    flat: dict[str, tuple[Any, Any]] = {}
    for key, want in reference.items():
        items = want.items() if isinstance(want, dict) else [(None, want)]
        for k, w in items:
            name = key if k is None else f"{key} {k!r}"
            got = other[key] if k is None else other[key][k]
            flat[name] = (w, got)
    for name, (want, got) in flat.items():
        if isinstance(want, Unanswered):
            checks.failures.append(f"tp1 directly, {name}: {want.text}")
        else:
            checks.equal(f"tp2 dp2 == tp1 directly, {name}", want, lambda got=got: got)
    checks.done()


@pytest.mark.parametrize("policy", ["cache_aware", "power_of_two"])
def test_regular_mode(
    router_py: Path, servers: Servers, reference: dict[str, Any], tmp_path: Path, policy: str
) -> None:
    urls = [servers.url["dp2"], servers.url["tp1"]]
    log = tmp_path / "router.log"
    with router(router_py, log, ["--worker-urls", *urls, "--policy", policy]) as r:
        r.wait_workers(2)
        checks = Checks(f"sglang-router --policy {policy}", log)
        # The model id comes from the workers' /server_info (or /model_info): not "unknown".
        checks.equal("router /v1/models", [MODEL], lambda: [m.id for m in r.client().models.list()])
        if policy == "power_of_two":  # reads each worker's /get_load; -1 = could not parse it
            checks.true(
                "router /get_loads: every worker's load parsed (>= 0)",
                lambda: all(
                    w["load"] >= 0 for w in httpx.get(r.url + "/get_loads").json()["workers"]
                ),
            )
        _check_regular(checks, r.client(), r.url, reference)
        checks.done()


def test_regular_mode_dp_aware(
    router_py: Path, servers: Servers, reference: dict[str, Any], tmp_path: Path
) -> None:
    """--dp-aware: the router reads each worker's dp_size from /server_info, lists one worker per
    DP rank (`URL@rank`) and pins each request with `data_parallel_rank`."""
    urls = [servers.url["dp2"], servers.url["tp1"]]
    log = tmp_path / "router.log"
    args = ["--worker-urls", *urls, "--policy", "cache_aware", "--dp-aware"]
    with router(router_py, log, args) as r:
        listed = r.wait_workers(3)
        checks = Checks("sglang-router --dp-aware", log)
        want_urls = sorted([f"{urls[0]}@0", f"{urls[0]}@1", f"{urls[1]}@0"])
        checks.equal(
            "router /workers (one per DP rank)", want_urls, lambda: sorted(w["url"] for w in listed)
        )
        _check_regular(checks, r.client(), r.url, reference)
        checks.done()


@pytest.mark.parametrize("with_port", [True, False], ids=["bootstrap-port", "no-bootstrap-port"])
def test_pd_mode(
    router_py: Path, servers: Servers, reference: dict[str, Any], tmp_path: Path, with_port: bool
) -> None:
    """`--prefill URL [PORT]`: without the port the router sends `bootstrap_port: null` (the
    configured port is meant); n = 2 and prompt lists get arrays of bootstrap fields, and
    `stream: true` goes to the prefill server too."""
    prefill = [servers.url["prefill"]]
    if with_port:
        prefill.append(str(servers.bootstrap_port))
    args = ["--pd-disaggregation", "--prefill", *prefill, "--decode", servers.url["decode"]]
    log = tmp_path / "router.log"
    with router(router_py, log, args) as r:
        r.wait_workers(2)
        c = r.client()
        where = f"sglang-router PD ({'with' if with_port else 'without'} the bootstrap port)"
        checks = Checks(where, log)
        # The router reads the prefill server's load_balance_method from /server_info: at dp > 1
        # it must be follow_bootstrap_room (the DP group is room % dp), else it warns.
        checks.true(
            "prefill /server_info load_balance_method (no 'rank mismatch' warning)",
            lambda: "rank mismatch" not in log.read_text(errors="replace"),
        )
        for p in PROMPTS[:2]:
            want = reference["complete"][p]
            checks.equal(f"completion {p!r}", want, lambda p=p: complete(c, p))
            checks.equal(f"completion stream {p!r}", want, lambda p=p: complete_stream(c, p))
        checks.equal("completion prompt list", reference["list"], lambda: complete(c, PROMPTS[:2]))
        checks.equal(
            "completion prompt list stream",
            reference["list"],
            lambda: complete_stream(c, PROMPTS[:2]),
        )
        checks.equal("completion n=2", reference["n2"], lambda: complete(c, PROMPTS[0], n=2))
        checks.equal(
            "completion n=2 stream", reference["n2"], lambda: complete_stream(c, PROMPTS[0], n=2)
        )
        m = CHATS[0]
        checks.equal(f"chat {m!r}", reference["chat"][m], lambda: chat(c, m))
        checks.equal(f"chat stream {m!r}", reference["chat"][m], lambda: chat_stream(c, m))
        checks.equal("chat n=2", reference["chat_n2"], lambda: chat(c, m, n=2))
        checks.equal("chat n=2 stream", reference["chat_n2"], lambda: chat_stream(c, m, n=2))
        p = PROMPTS[0]
        checks.equal(f"/generate {p!r}", reference["generate"][p], lambda: generate(r.url, p))
        checks.equal(
            f"/generate stream {p!r}",
            reference["generate"][p],
            lambda: generate(r.url, p, stream=True),
        )
        checks.done()
