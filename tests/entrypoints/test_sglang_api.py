"""dpattn as an SGLang worker: the worker routes sglang-router reads (/server_info, /model_info,
/get_load, /health_generate), SGLang's extension fields (each accepted one accepted, each
refused one refused naming it, unknown keys still refused), the synonyms (data_parallel_rank,
max_completion_tokens, sampling_seed), the honoured fields, and /generate's SGLang semantics
(cumulative streaming, batches, n, finish_reason objects, defaults)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from server_harness import MODEL, ServerThread, _m, _metrics, _rank, _wait_for

from dpattn.entrypoints import sglang_api
from dpattn.entrypoints.chat_template import ChatTemplate
from dpattn.entrypoints.sglang_fields import EXTENSIONS

USER = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0}
KINDS = {"c": "/v1/chat/completions", "p": "/v1/completions", "g": "/generate", "s": "/generate"}

# A value each refusable field refuses (the table's rows with a list of accepted values).
REFUSED: dict[str, Any] = {
    "return_hidden_states": True,
    "lora_path": "my-adapter",
    "lora_id": "a1",
    "session_params": {"id": "s"},
    "structural_tag": "{}",
    "stop_regex": "x+",
    "min_tokens": 3,
    "min_new_tokens": 3,
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
    "repetition_penalty": 1.2,
    "spaces_between_special_tokens": False,
    "custom_logit_processor": "{}",
    "custom_params": {"k": 1},
    "extra_key": "tenant",
    "cache_salt": "salt",
    "priority": 1,
    "custom_labels": {"team": "a"},
    "reasoning_effort": "high",
    "token_ids_logprob": [5],
    "background": True,
    "return_entropy": True,
    "return_bytes": True,
    "image_data": "a.png",
    "video_data": "a.mp4",
    "audio_data": "a.wav",
    "input_embeds": [[0.1]],
    "modalities": ["image"],
    "max_dynamic_patch": 4,
    "min_dynamic_patch": 1,
    "use_audio_in_video": True,
    "conversation_id": "conv",
}


def body(kind: str, extra: dict[str, Any], max_new: int = 2) -> dict[str, Any]:
    """A small request of `kind` with `extra` at the top level (kind s: in sampling_params)."""
    if kind == "c":
        return {"model": MODEL, "messages": USER, "max_tokens": max_new, **extra}
    if kind == "p":
        return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_new, **extra}
    sp = {"max_new_tokens": max_new, **(extra if kind == "s" else {})}
    return {"text": "Once upon a time", "sampling_params": sp, **({} if kind == "s" else extra)}


def post(server: ServerThread, path: str, json_body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=json_body, timeout=60)


def stream_events(server: ServerThread, json_body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST", server.url + "/generate", json={**json_body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _quiet(engine: Any, seconds: float = 0.5) -> bool:
    """No scheduler step for `seconds` (the aborted probe's last steps are in)."""
    last = engine.step_stats[-1] if engine.step_stats else None
    time.sleep(seconds)
    return (engine.step_stats[-1] if engine.step_stats else None) is last


# ---- worker routes ----
def test_server_and_model_info(server: ServerThread) -> None:
    info = httpx.get(server.url + "/server_info").json()
    assert info == httpx.get(server.url + "/get_server_info").json()
    engine = server.state.engine
    assert info["served_model_name"] == MODEL and info["model_path"] == engine.cfg.model_path
    assert (info["tp_size"], info["dp_size"], info["enable_dp_attention"]) == (2, 2, True)
    assert info["load_balance_method"] == "round_robin" and info["disaggregation_mode"] == "null"
    assert info["context_length"] == engine.context_length
    assert info["max_total_tokens"] == engine.limits.kv_pool_tokens == engine.kv_total[0]
    assert info["vocab_size"] == engine.limits.vocab_size
    assert info["max_running_requests"] == engine.cfg.scheduler.max_running_requests
    assert [s["dp_rank"] for s in info["internal_states"]] == [0, 1]
    model = httpx.get(server.url + "/model_info").json()
    assert model == httpx.get(server.url + "/get_model_info").json()
    assert model["model_path"] == model["tokenizer_path"] == engine.cfg.model_path
    assert model["is_generation"] is True and model["model_type"] == "qwen3_moe"


def test_get_load_per_dp_rank(server: ServerThread) -> None:
    assert _wait_for(server.state.engine.kv_pools_full)
    idle = httpx.get(server.url + "/get_load").json()
    zero = {"num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
    assert idle == [{"dp_rank": d, **zero} for d in (0, 1)]
    long = body("s", {"ignore_eos": True, **GREEDY}, max_new=300)
    seen: list[Any] = []
    with httpx.stream(
        "POST", server.url + "/generate", json={**long, "stream": True, "dp_rank": 1}, timeout=60
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 20:  # decoding on DP group 1
                seen = httpx.get(server.url + "/get_load").json()
    assert seen[1]["num_reqs"] == 1 and seen[1]["num_tokens"] > 0
    assert seen[0] == {"dp_rank": 0, **zero}
    assert _wait_for(lambda: httpx.get(server.url + "/get_load").json() == idle)


def test_health_generate(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _m(_metrics(server.url), "dpattn_generation_tokens_total", **_rank(0))
    before += _m(_metrics(server.url), "dpattn_generation_tokens_total", **_rank(1))
    r = httpx.get(server.url + "/health_generate", timeout=30)
    assert r.status_code == 200 and r.json()["generated"] is True
    after = sum(
        _m(_metrics(server.url), "dpattn_generation_tokens_total", **_rank(d)) for d in (0, 1)
    )
    assert after == before + 1  # a real one-token generation ran
    monkeypatch.setattr(sglang_api, "HEALTH_GENERATE_TIMEOUT_S", 0.0)
    r = httpx.get(server.url + "/health_generate", timeout=30)
    assert r.status_code == 503 and "did not finish" in r.json()["error"]["message"]
    assert _wait_for(server.state.engine.kv_pools_full)  # the probe was aborted, KV freed
    # A full queue: healthy if the engine steps meanwhile, 503 if it does not.
    assert _wait_for(lambda: _quiet(server.state.engine), timeout=30)
    monkeypatch.setattr(sglang_api, "HEALTH_GENERATE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server.state, "max_in_flight", 0)
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 503
    monkeypatch.setattr(sglang_api, "HEALTH_GENERATE_TIMEOUT_S", 20.0)
    monkeypatch.setattr(server.state, "max_in_flight", 1)
    codes: list[int] = []
    events = threading.Event()

    def probe() -> None:
        events.wait(30)
        codes.append(httpx.get(server.url + "/health_generate", timeout=30).status_code)

    t = threading.Thread(target=probe)
    t.start()
    long = body("s", {"ignore_eos": True, **GREEDY}, max_new=200)
    with httpx.stream("POST", server.url + "/generate", json={**long, "stream": True}) as r:
        for _ in r.iter_lines():
            events.set()
    t.join()
    assert codes == [200]


# ---- extension fields ----
def test_each_extension_field_accepted_at_its_default_and_router_bodies(
    server: ServerThread,
) -> None:
    for kind in "cpgs":
        defaults = {k: e.default for k, e in EXTENSIONS.items() if kind in e.kinds}
        r = post(server, KINDS[kind], body(kind, defaults))
        assert r.status_code == 200, (kind, r.text)
    # no-op and honoured fields at other values
    others = {
        "c": {"separate_reasoning": False, "stream_reasoning": False, "min_tokens": None},
        "g": {"log_metrics": False, "no_logs": True, "return_text_in_logprobs": True},
        "s": {"stream_interval": 4, "frequency_penalty": 0, "repetition_penalty": 1},
    }
    for kind, extra in others.items():
        assert post(server, KINDS[kind], body(kind, extra)).status_code == 200, kind
    # what sglang-router 0.3.2 sends (its re-serialised bodies, SGLang's defaults added)
    router_bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0.0, "stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True, "return_hidden_states": False}),
        ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_completion_tokens": 2, "logprobs": False, "stream": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False, "data_parallel_rank": 1}),
        ("/generate", {"text": "Hello", "model": None, "sampling_params": {"temperature": 0.0, "max_new_tokens": 2}, "return_text_in_logprobs": False, "stream": False, "log_metrics": True, "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False, "return_entropy": False, "data_parallel_rank": 0}),
    ]  # fmt: skip
    for path, b in router_bodies:
        assert post(server, path, b).status_code == 200, (path, b)


def test_each_refused_field_is_a_400_naming_it(server: ServerThread) -> None:
    refusable = {k for k, e in EXTENSIONS.items() if e.accepted is not None}
    assert refusable == set(REFUSED), "every refusable field needs a refused value here"
    for name, value in REFUSED.items():
        for kind in EXTENSIONS[name].kinds:
            r = post(server, KINDS[kind], body(kind, {name: value}))
            err = r.json()["error"]
            assert r.status_code == 400, (kind, name, r.text)
            want = f"sampling_params.{name}" if kind == "s" else name
            assert err["param"] == want and err["code"] == "unsupported_parameter", (kind, err)
            assert name in err["message"]
    for kind in "cpgs":  # keys in no schema stay an error
        r = post(server, KINDS[kind], body(kind, {"bogus_field": 1}))
        assert r.status_code == 400 and "bogus_field" in r.json()["error"]["param"], kind
    r = post(server, "/generate", body("g", {"rid": ["a", "b"]}))  # one per output
    assert r.status_code == 400 and r.json()["error"]["param"] == "rid"


def test_data_parallel_rank_and_seed_synonyms(server: ServerThread) -> None:
    for name in ("data_parallel_rank", "routed_dp_rank"):
        out = post(server, "/generate", body("g", {name: 1})).json()
        assert out["meta_info"]["dp_rank"] == 1
        m0 = _m(_metrics(server.url), "dpattn_prompt_tokens_total", **_rank(0))
        for kind in "cp":
            assert post(server, KINDS[kind], body(kind, {name: 0, "dp_rank": 0})).status_code == 200
            bad = post(server, KINDS[kind], body(kind, {name: 0, "dp_rank": 1}))
            assert bad.status_code == 400 and bad.json()["error"]["param"] == name
        assert _m(_metrics(server.url), "dpattn_prompt_tokens_total", **_rank(0)) > m0
    r = post(server, "/generate", body("g", {"data_parallel_rank": 1}) | {"dp_rank": 0})
    assert r.status_code == 400
    sampled = {"temperature": 1.0, "max_tokens": 6}
    a = post(server, "/v1/completions", body("p", {**sampled, "seed": 11})).json()
    b = post(server, "/v1/completions", body("p", {**sampled, "sampling_seed": 11})).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    g = post(server, "/generate", body("s", {"temperature": 1.0, "sampling_seed": 11}, 6)).json()
    assert (
        g["output_ids"]
        == post(server, "/generate", body("s", {"seed": 11}, 6)).json()["output_ids"]
    )
    r = post(server, "/v1/completions", body("p", {"seed": 1, "sampling_seed": 2}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_seed"


def test_max_completion_tokens(server: ServerThread) -> None:
    out = post(server, KINDS["c"], {"model": MODEL, "messages": USER, "max_completion_tokens": 3})
    assert out.json()["usage"]["completion_tokens"] == 3
    same = {"model": MODEL, "messages": USER, "max_completion_tokens": 3, "max_tokens": 3}
    assert post(server, KINDS["c"], same).status_code == 200
    r = post(server, KINDS["c"], {**same, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_rid_is_the_response_id(server: ServerThread) -> None:
    assert post(server, KINDS["c"], body("c", {"rid": "req-c"})).json()["id"] == "req-c"
    assert post(server, KINDS["p"], body("p", {"rid": "req-p"})).json()["id"] == "req-p"
    one = post(server, "/generate", body("g", {"rid": "req-g"})).json()
    assert one["meta_info"]["id"] == "req-g"
    two = post(server, "/generate", body("s", {}) | {"text": ["a", "b"], "rid": ["r0", "r1"]})
    assert [o["meta_info"]["id"] for o in two.json()] == ["r0", "r1"]


def test_no_stop_trim_keeps_the_stop_string(server: ServerThread) -> None:
    prompt = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 20, **GREEDY}
    base = post(server, KINDS["p"], prompt).json()["choices"][0]["text"]
    stop = base[6:9]
    cut = base[: base.index(stop)]
    for stream in (False, True):
        kw = {**prompt, "stop": [stop], "stream": stream}
        trimmed = post(server, KINDS["p"], kw)
        kept = post(server, KINDS["p"], {**kw, "no_stop_trim": True})
        texts = [_completion_text(r, stream) for r in (trimmed, kept)]
        assert texts[0] == cut and texts[1].startswith(cut + stop), (stream, texts)
    gen = {"text": "The quick brown fox", "sampling_params": {**GREEDY, "stop": stop}}
    out = post(server, "/generate", gen).json()
    assert out["text"] == cut
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    gen["sampling_params"]["no_stop_trim"] = True
    assert post(server, "/generate", gen).json()["text"].startswith(cut + stop)


def _completion_text(r: httpx.Response, stream: bool) -> str:
    if not stream:
        return str(r.json()["choices"][0]["text"])
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if json.loads(e)["choices"])


def test_continue_final_message_and_template_variables(server: ServerThread) -> None:
    tok = server.state.tokenizer
    template = ChatTemplate(
        "test", "{{ greeting }}{% for m in messages %}[{{ m.content }}]{% endfor %}"
    )
    assert template.render(tok, USER, variables={"greeting": "Hi "}) == "Hi [Tell me a story.]"
    convo = [*USER, {"role": "assistant", "content": "Once upon a"}]
    kw = {"model": MODEL, "messages": convo, "max_tokens": 5, **GREEDY}
    cont = post(server, KINDS["c"], {**kw, "continue_final_message": True}).json()
    closed = post(server, KINDS["c"], kw).json()
    opened = server.state.engine.tokenizer.apply_chat_template(
        USER, tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(opened + "Once upon a", add_special_tokens=False)
    ref = post(server, KINDS["p"], {"model": MODEL, "prompt": ids, "max_tokens": 5, **GREEDY})
    assert cont["usage"]["prompt_tokens"] == len(ids) < closed["usage"]["prompt_tokens"]
    assert cont["choices"][0]["message"]["content"] == ref.json()["choices"][0]["text"]
    bad = post(server, KINDS["c"], {**kw, "chat_template_kwargs": {"tokenize": True}})
    assert bad.status_code == 400  # a variable the renderer refuses: the request's fault


# ---- /generate: SGLang's semantics ----
def test_generate_stream_text_is_cumulative(server: ServerThread) -> None:
    req = body("s", {**GREEDY, "ignore_eos": True}, 16) | {"return_logprob": True}
    whole = post(server, "/generate", req).json()
    events = stream_events(server, req)
    assert len(events) > 3 and "index" not in events[0]
    for a, b in zip(events, events[1:]):
        assert b["text"].startswith(a["text"])
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
        assert a["meta_info"]["finish_reason"] is None
    last = events[-1]
    assert (last["text"], last["output_ids"]) == (whole["text"], whole["output_ids"])
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
    meta = last["meta_info"]
    assert meta["completion_tokens"] == 16 and meta["prompt_tokens"] > 0
    assert meta["cached_tokens"] >= 0 and meta["e2e_latency"] > 0
    lps = [[lp, t] for lp, t, _ in meta["output_token_logprobs"]]
    assert lps == [[lp, t] for lp, t, _ in whole["meta_info"]["output_token_logprobs"]]


def test_generate_batches_n_and_finish_reasons(server: ServerThread) -> None:
    sp = {**GREEDY, "max_new_tokens": 4, "n": 2, "ignore_eos": True}
    out = post(server, "/generate", {"text": ["The sea", "A cat"], "sampling_params": sp}).json()
    assert len(out) == 4 and out[0]["text"] == out[1]["text"] and out[2]["text"] == out[3]["text"]
    assert len({o["meta_info"]["dp_rank"] for o in out[:2]}) == 1  # one prompt's copies: one group
    ids = post(server, "/generate", {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": sp})
    assert [len(o["output_ids"]) for o in ids.json()] == [4, 4, 4, 4]
    events = stream_events(server, {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": sp})
    last = {e["index"]: e for e in events}
    assert [last[i]["text"] for i in range(4)] == [o["text"] for o in ids.json()]
    first = post(server, "/generate", body("s", GREEDY, 1)).json()["output_ids"][0]
    stopped = post(server, "/generate", body("s", {**GREEDY, "stop_token_ids": [first]}, 4))
    assert stopped.json()["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    bias = post(server, "/generate", body("s", {**GREEDY, "logit_bias": {"42": 100}}, 3))
    assert bias.json()["output_ids"] == [42, 42, 42]
    text_lp = body("g", {"return_logprob": True, "return_text_in_logprobs": True})
    entries = post(server, "/generate", text_lp).json()["meta_info"]["output_token_logprobs"]
    tok = server.state.tokenizer
    assert [text for _, _, text in entries] == [tok.decode([t]) for _, t, _ in entries]
    plain = post(server, "/generate", body("g", {"return_logprob": True})).json()
    assert all(text is None for _, _, text in plain["meta_info"]["output_token_logprobs"])


def test_generate_defaults_are_sglangs(server: ServerThread) -> None:
    out = post(
        server, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {"ignore_eos": True}}
    )
    assert out.json()["meta_info"]["completion_tokens"] == 128  # SGLang's max_new_tokens
    r = post(server, "/generate", {"text": "x", "model": "other-model"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = post(server, "/generate", {"text": ["a", "b"], "sampling_params": [{"n": 1}, {"n": 2}]})
    assert r.status_code == 400
