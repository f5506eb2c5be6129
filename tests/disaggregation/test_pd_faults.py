"""Faults on either side of a disaggregated pair (rank threads, real zmq transfer): aborts at
every queue stage, a prefill server that dies, timeouts, a KV layout mismatch. Every request
ends (never a hang), failures name their reason, and both sides' pools and rows come back."""

from __future__ import annotations

from pathlib import Path

from pd_harness import Spec, check_groups, merged, run_colocated, run_pd
from test_pd_protocol import assert_same

from dpattn.distributed.parallel_state import Layout

# Long enough for a loaded machine, short enough for the requests that are meant to time out.
FAST = dict(disaggregation_bootstrap_timeout_s=4.0, disaggregation_transfer_timeout_s=5.0)


def spec(rid: str, n: int = 6, new: int = 8, room: int = 0, **kw: object) -> Spec:
    prompt = tuple(range(7, 7 + n))
    return Spec(rid, prompt, new, room=room or abs(hash(rid)) % 2**62, **kw)  # type: ignore[arg-type]


def test_aborts_at_every_stage_free_both_sides(tiny_models: dict[str, Path]) -> None:
    model = tiny_models["llama"]
    specs = (
        # prefill: aborted in the bootstrap queue, before the decode side's handshake
        spec("p-bootstrap", abort_prefill_at=0, decode_waits_for="prefill-aborted:p-bootstrap"),
        # prefill: aborted mid chunked prefill (60 tokens, 8 a step)
        spec("p-chunk", n=60, abort_prefill_after_bootstrap=2),
        # prefill: aborted in the waiting queue, behind a long prompt's chunks
        spec("p-long", n=60, new=3),
        spec(
            "p-waiting",
            prefill_waits_for="prefill-left-bootstrap:p-long",
            abort_prefill_after_bootstrap=1,
        ),
        # decode: aborted in the prealloc queue (the prefill side times its handshake out)
        spec("d-prealloc", abort_decode_at=0, prefill_waits_for="decode-aborted:d-prealloc"),
        # decode: aborted in the transfer queue, before the prefill side has the request
        spec("d-transfer", abort_decode_at=3, prefill_waits_for="decode-aborted:d-transfer"),
        # decode: aborted while running
        spec("d-running", new=40, abort_decode_after_tokens=2),
        spec("ok", n=11),
    )
    p_runs, d_runs = run_pd(model, (1, 1), (2, 1), specs, prefill_kw=FAST, decode_kw=FAST)
    check_groups(p_runs, Layout(1, 1))  # pools and rows back on both sides, lock-step queues
    check_groups(d_runs, Layout(2, 1))
    got = merged(d_runs)
    normal = tuple(s for s in specs if s.rid in ("ok", "p-long"))
    for s in specs:
        if s not in normal:
            assert got[s.rid].finish_reason == "abort", s.rid
    assert len(got["d-running"].ids) >= 2
    assert_same(got, run_colocated(model, normal), normal)
    assert all(r.finish_reason is not None for r in merged(p_runs).values())
    reasons = d_runs[0].failures
    assert "aborted on the prefill server" in reasons["p-bootstrap"]
    assert "aborted on the prefill server" in reasons["p-waiting"]


def test_dead_prefill_server_fails_its_decode_requests(tiny_models: dict[str, Path]) -> None:
    specs = tuple(spec(f"r{i}", prefill_waits_for="never") for i in range(3))
    _, d_runs = run_pd(
        tiny_models["llama"], (1, 1), (2, 2), specs, prefill_stop_at=20, decode_kw=FAST
    )
    check_groups(d_runs, Layout(2, 2))
    for s in specs:
        assert merged(d_runs)[s.rid].finish_reason == "abort"
    reasons = {**d_runs[0].failures, **d_runs[1].failures}
    assert all("prefill server 127.0.0.1:" in r and "is gone" in r for r in reasons.values())
    assert set(reasons) == {s.rid for s in specs}


def test_bootstrap_and_transfer_timeouts(tiny_models: dict[str, Path]) -> None:
    """Each request alone in its run, so the timeouts can be short."""
    model = tiny_models["llama"]
    # No prefill rank ever registers: the decode side gives up after the bootstrap timeout.
    quick = dict(disaggregation_bootstrap_timeout_s=1.0)
    _, d_runs = run_pd(
        model, (1, 1), (1, 1), (spec("lonely"),), decode_kw=quick, start_prefill=False
    )
    check_groups(d_runs, Layout(1, 1))
    assert "timed out" in d_runs[0].failures["lonely"]
    # The prefill server lives but never gets the request: the transfer timeout ends it.
    quick = dict(disaggregation_transfer_timeout_s=1.5)
    specs = (spec("orphan", only_decode=True),)
    p_runs, d_runs = run_pd(model, (1, 1), (1, 1), specs, decode_kw=quick)
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(1, 1))
    assert merged(d_runs)["orphan"].finish_reason == "abort"
    assert "timed out" in d_runs[0].failures["orphan"]


def test_idle_prefill_server_answers_a_late_handshake(tiny_models: dict[str, Path]) -> None:
    """The prefill server gave the request up (no handshake in time) and has nothing else to
    do when the decode server's handshake comes: it still answers, so the decode request fails
    at once with the prefill's reason, not after its own transfer timeout (30 s here)."""
    specs = (spec("late", decode_waits_for="prefill-done:late"),)
    p_runs, d_runs = run_pd(
        tiny_models["llama"],
        (1, 1),
        (1, 1),
        specs,
        prefill_kw=dict(disaggregation_bootstrap_timeout_s=0.5),
        decode_kw=dict(disaggregation_transfer_timeout_s=30.0),
    )
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(1, 1))
    assert merged(d_runs)["late"].finish_reason == "abort"
    assert "no handshake from the decode server within 0.5 s" in d_runs[0].failures["late"]


def test_kv_layout_mismatch_is_refused(tiny_models: dict[str, Path]) -> None:
    specs = (spec("x"),)
    p_runs, d_runs = run_pd(
        tiny_models["llama"], (1, 1), (1, 1), specs, prefill_kw={"dtype": "bfloat16", **FAST},
        decode_kw=FAST,
    )  # fmt: skip
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(1, 1))
    reason = d_runs[0].failures["x"]
    assert "KV layout mismatch" in reason and "dtype bfloat16 vs float32" in reason, reason
    assert merged(p_runs)["x"].finish_reason == "abort"


def test_gqa_prefill_and_mla_decode_are_refused(
    tiny_models: dict[str, Path], mla_models: dict[str, Path]
) -> None:
    """A GQA model's K and V never land in an MLA latent pool: the decode side's layout check
    fails the request with both kinds named, and the prefill server gives it up too."""
    specs = (spec("x"),)
    p_runs, d_runs = run_pd(
        tiny_models["llama"], (1, 1), (2, 1), specs, prefill_kw=FAST, decode_kw=FAST,
        decode_model=mla_models["deepseek_v2"],
    )  # fmt: skip
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(2, 1))
    reason = d_runs[0].failures["x"]
    assert "KV layout mismatch" in reason and "attention kind GQA vs MLA" in reason, reason
    assert merged(d_runs)["x"].finish_reason == "abort"
    assert merged(p_runs)["x"].finish_reason == "abort"
