"""A prefill and a decode server as SGLang's router drives them in PD mode: the same body to
both, `stream` included, with the bootstrap fields as that router writes them (a null port,
u64 rooms, lists for prompt lists, chat `n > 1` and `input_ids` batches, a single room for
completions `n > 1`), and `--load-balance-method follow_bootstrap_room` at dp 2. The decode
server's answers equal a colocated server's; the prefill server answers a streamed request.
(tests/entrypoints/test_sglang_router.py runs the real router, opt-in.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pd_servers import wait_for
from proc_harness import Uvicorn, free_port

from dpattn.config import EngineConfig
from dpattn.disaggregation.frontend import BootstrapFields, bootstrap_of
from dpattn.entrypoints.engine import Engine
from dpattn.entrypoints.http_server import create_app
from dpattn.messages import BootstrapInfo

BIG = 2**64 - 3  # the router mints u64 rooms: past 2**63 too
PROMPTS = [[5, 17, 99, 3], list(range(3, 20))]


# ---- the fields, alone ----------------------------------------------------------------------


def rooms(fields: BootstrapFields, sequences: int) -> list[int]:
    return [b.room for b in fields.per_sequence(sequences, 8998)]


def test_bootstrap_fields_one_per_sequence_in_sglangs_order() -> None:
    """Sequences are prompt-major (prompt i's n choices together). A list has an entry per
    sequence, per prompt or per choice, or one; rooms are offset so that none is shared."""
    h = "10.0.0.7"
    # a single room (completions n = 2, /generate n = 2): room + k, as SGLang expands it
    one = BootstrapFields(h, None, BIG, prompts=1)
    assert one.per_sequence(2, 8998) == [
        BootstrapInfo(h, 8998, BIG),
        BootstrapInfo(h, 8998, BIG + 1),
    ]
    assert rooms(one, 4)[3] == 0  # modulo 2**64
    # one entry per sequence (chat n = 2; a prompt list or an input_ids batch with n = 1)
    per_seq = BootstrapFields([h, h], [18100, None], [11, 22], prompts=1)
    assert per_seq.per_sequence(2, 8998) == [
        BootstrapInfo(h, 18100, 11),
        BootstrapInfo(h, 8998, 22),
    ]
    # one per prompt with n = 2 (the router's completions prompt list): prompt i's entry + j
    per_prompt = BootstrapFields([h, h], [None, None], [100, 200], prompts=2)
    assert rooms(per_prompt, 4) == [100, 101, 200, 201]
    # one per choice with several prompts: choice j's entry + i
    per_choice = BootstrapFields(h, 7000, [100, 200, 300], prompts=2)
    assert rooms(per_choice, 6) == [100, 200, 300, 101, 201, 301]
    assert rooms(BootstrapFields([h], [None], [5], prompts=2), 4) == [5, 6, 7, 8]


@pytest.mark.parametrize(
    "fields,sequences,message",
    [
        (BootstrapFields("h", None, [1, 2, 3], prompts=2), 4, "bootstrap_room has 3 entries for 4"),
        (BootstrapFields(["h"] * 3, None, 1, prompts=2), 4, "bootstrap_host has 3 entries"),
        (BootstrapFields("h", None, -1), 1, "bootstrap_room must be an integer in [0, 2**64)"),
        (BootstrapFields("h", None, 2**64), 1, "bootstrap_room must be an integer in [0, 2**64)"),
        (BootstrapFields("h", 0, 1), 1, "bootstrap_port must be a port number or null"),
        (BootstrapFields("", None, 1), 1, "bootstrap_host must be a host name"),
    ],
)
def test_bootstrap_fields_that_do_not_fit_are_refused_by_name(
    fields: BootstrapFields, sequences: int, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        fields.per_sequence(sequences, 8998)
    assert message in str(err.value)


def test_bootstrap_needs_host_and_room_but_not_the_port() -> None:
    body = dict(bootstrap_host="h", bootstrap_port=None, bootstrap_room=3)
    assert bootstrap_of(SimpleNamespace(**body)) == BootstrapFields("h", None, 3)
    assert bootstrap_of(SimpleNamespace(**{**body, "bootstrap_room": None})) is None
    assert bootstrap_of(SimpleNamespace(**{**body, "bootstrap_host": None})) is None


@pytest.mark.parametrize(
    "method,mode,policy",
    [
        ("follow_bootstrap_room", "prefill", "follow_bootstrap_room"),
        ("follow_bootstrap_room", "decode", "follow_bootstrap_room"),
        ("auto", "prefill", "follow_bootstrap_room"),
        ("auto", "decode", "round_robin"),
        ("auto", "null", "round_robin"),
        ("total_requests", "null", "shortest_queue"),
        ("total_tokens", "decode", "minimum_tokens"),
        ("round_robin", "prefill", "round_robin"),  # a prefill server routes by room anyway
    ],
)
def test_sglang_load_balance_methods(method: str, mode: str, policy: str) -> None:
    cfg = EngineConfig.from_options("m", 2, 2, router_policy=method, disaggregation_mode=mode)
    assert cfg.router_policy == policy


def test_load_balance_methods_dpattn_lacks_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="needs --disaggregation-mode prefill or decode"):
        EngineConfig.from_options("m", 2, 2, router_policy="follow_bootstrap_room")
    with pytest.raises(ValueError, match="'decode_round_robin' is not one dpattn has: use one of"):
        EngineConfig.from_options("m", 2, 2, router_policy="decode_round_robin")


# ---- over HTTP, as the router sends it ------------------------------------------------------


class Pair:
    """Prefill (2, 2) and decode (2, 2) servers at follow_bootstrap_room, both configured with
    the same bootstrap port (what a null bootstrap_port stands for), and a colocated server."""

    def __init__(self, model: Path) -> None:
        port = free_port()
        common: dict[str, Any] = dict(
            backend="thread",
            kv_pool_tokens=256,
            chunked_prefill_size=8,
            disable_radix_cache=True,
            router_policy="follow_bootstrap_room",
            disaggregation_bootstrap_port=port,
        )
        self.engines = [
            Engine(str(model), 2, 2, disaggregation_mode="prefill", **common),
            Engine(str(model), 2, 2, disaggregation_mode="decode", **common),
            Engine(str(model), 1, 1, backend="thread", kv_pool_tokens=256),
        ]
        self.servers = [Uvicorn(create_app(e)) for e in self.engines]
        self.prefill, self.decode, self.colocated = (s.url for s in self.servers)
        self.pool = ThreadPoolExecutor(2)

    def pd(self, path: str, body: dict[str, Any], **boot: Any) -> httpx.Response:
        """What the router does: the same body to both servers at once; the decode answer."""
        body = {**body, **boot}
        p = self.pool.submit(httpx.post, self.prefill + path, json=body, timeout=60)
        d = self.pool.submit(httpx.post, self.decode + path, json=body, timeout=60)
        prefill = p.result()
        assert prefill.status_code == 200, prefill.text
        if body.get("stream"):  # what a streaming client of SGLang's prefill server gets
            assert prefill.headers["content-type"].startswith("text/event-stream")
            assert prefill.text.rstrip().endswith("data: [DONE]")
        return d.result()

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        for e in self.engines:
            e.shutdown()
        self.pool.shutdown()


@pytest.fixture(scope="module")
def pair(tiny_models: dict[str, Path]) -> Iterator[Pair]:
    p = Pair(tiny_models["llama"])
    try:
        yield p
    finally:
        p.close()


def host(n: int | None = None) -> Any:
    return "127.0.0.1" if n is None else ["127.0.0.1"] * n


def texts(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    return [c["text"] if "text" in c else c["message"]["content"] for c in choices]


def sse_text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    out = ""
    for line in resp.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out += "".join(c.get("text", "") for c in json.loads(line[6:])["choices"])
    return out


def test_prefill_and_decode_answer_sglang_router_bodies_as_colocated(pair: Pair) -> None:
    ref = {
        tuple(ids): texts(
            httpx.post(
                pair.colocated + "/v1/completions",
                json=dict(prompt=ids, max_tokens=5, temperature=0),
                timeout=60,
            )
        )[0]
        for ids in PROMPTS
    }
    a, b = (ref[tuple(ids)] for ids in PROMPTS)
    body = dict(prompt=PROMPTS[0], max_tokens=5, temperature=0)
    # --prefill URL without a port: bootstrap_port null; a room past 2**63
    got = pair.pd("/v1/completions", body, bootstrap_host=host(), bootstrap_port=None,
                  bootstrap_room=BIG)  # fmt: skip
    assert texts(got) == [a]
    # completions n = 2: the router sends one room (each choice takes room + j)
    got = pair.pd("/v1/completions", {**body, "n": 2}, bootstrap_host=host(),
                  bootstrap_port=None, bootstrap_room=12345)  # fmt: skip
    assert texts(got) == [a, a]
    # a prompt list, n = 1 and n = 2: one entry per prompt (not per choice)
    both = dict(prompt=PROMPTS, max_tokens=5, temperature=0)
    boot = dict(bootstrap_host=host(2), bootstrap_port=[None, None], bootstrap_room=[7, BIG])
    assert texts(pair.pd("/v1/completions", both, **boot)) == [a, b]
    assert texts(pair.pd("/v1/completions", {**both, "n": 2}, **boot)) == [a, a, b, b]
    # chat n = 2: one entry per choice
    chat = dict(messages=[{"role": "user", "content": "Hello there"}], max_tokens=4,
                temperature=0)  # fmt: skip
    ref_chat = texts(httpx.post(pair.colocated + "/v1/chat/completions", json=chat, timeout=60))
    got = pair.pd("/v1/chat/completions", {**chat, "n": 2}, bootstrap_host=host(2),
                  bootstrap_port=[None, None], bootstrap_room=[31, 32])  # fmt: skip
    assert texts(got) == ref_chat * 2
    # /generate with an input_ids batch: one entry per prompt
    gen = dict(input_ids=PROMPTS, sampling_params=dict(max_new_tokens=5, temperature=0))
    ref_gen = httpx.post(pair.colocated + "/generate", json=gen, timeout=60).json()
    got = pair.pd("/generate", gen, bootstrap_host=host(2), bootstrap_port=[None, None],
                  bootstrap_room=[41, 42])  # fmt: skip
    assert got.status_code == 200, got.text
    assert [o["output_ids"] for o in got.json()] == [o["output_ids"] for o in ref_gen]
    # stream: true to both servers; the prefill server streams its first token, then [DONE]
    got = pair.pd("/v1/completions", {**body, "stream": True}, bootstrap_host=host(),
                  bootstrap_port=None, bootstrap_room=BIG - 1)  # fmt: skip
    assert sse_text(got) == a
    for engine in pair.engines:
        assert wait_for(engine.kv_pools_full), "KV slots leaked"


def test_bootstrap_lists_that_do_not_fit_are_a_400_naming_the_field(pair: Pair) -> None:
    body = dict(prompt=PROMPTS, max_tokens=2, bootstrap_host=host(), bootstrap_room=[1, 2, 3])
    for url in (pair.prefill, pair.decode):
        resp = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert resp.status_code == 400 and "bootstrap_room has 3 entries for 2" in resp.text
    assert wait_for(lambda: not pair.engines[1]._pending)
