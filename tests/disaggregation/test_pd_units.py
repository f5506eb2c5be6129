"""Small pieces of disaggregation: head plans across attention-TP widths, state order, KV layout
checks, the bootstrap service, the base scheduler's PREBUILT handling, the fake backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from pd_harness import check_groups, merged, run_pd, workload

from dpattn.config import RunnerConfig, SchedulerConfig
from dpattn.disaggregation.bootstrap import BootstrapServer, fetch_ranks, register_rank
from dpattn.disaggregation.layout import (
    KVLayout,
    RankInfo,
    expected_sources,
    kv_heads_of,
    plan_targets,
)
from dpattn.disaggregation.states import KVPoll, advance
from dpattn.disaggregation.transfer import FakeDecodeTransfer
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.forward_batch import ForwardMode
from dpattn.executor.model_runner import ModelRunner
from dpattn.executor.sampling_params import SamplingParams
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.schedule_batch import Req, ScheduleBatch
from dpattn.scheduler.scheduler import Scheduler


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("a_p", [1, 2, 4])
@pytest.mark.parametrize("a_d", [1, 2, 4])
def test_every_decode_head_comes_from_exactly_one_prefill_rank(
    heads: int, a_p: int, a_d: int
) -> None:
    endpoints = [f"d{a}" for a in range(a_d)]
    plan = plan_targets(heads, a_p, endpoints)
    assert set(plan) == set(range(a_p))  # every prefill rank gets a handshake
    for a, endpoint in enumerate(endpoints):
        got = sorted(
            h for targets in plan.values() for e, hs in targets if e == endpoint for h in hs
        )
        assert got == kv_heads_of(heads, a_d, a), "a decode rank lacks or doubles a head"
        senders = {p for p, targets in plan.items() if any(e == endpoint for e, _ in targets)}
        assert senders == expected_sources(heads, a_p, a_d, a)
    for p, targets in plan.items():  # a prefill rank only sends heads it holds
        assert all(set(hs) <= set(kv_heads_of(heads, a_p, p)) for _, hs in targets)


def test_states_only_move_forward_and_failed_sticks() -> None:
    assert advance(KVPoll.Transferring, KVPoll.WaitingForInput) is KVPoll.Transferring
    assert advance(KVPoll.Bootstrapping, KVPoll.Success) is KVPoll.Success
    assert advance(KVPoll.Failed, KVPoll.Success) is KVPoll.Failed
    assert advance(KVPoll.Success, KVPoll.Failed) is KVPoll.Failed
    assert min(KVPoll) is KVPoll.Failed and max(KVPoll) is KVPoll.Success


def test_kv_layout_mismatch_names_both_sides() -> None:
    a = KVLayout(1, "bfloat16", 64, 2, 8)
    assert a.mismatch(a) is None
    why = a.mismatch(KVLayout(1, "float32", 128, 3, 8))
    assert why is not None
    assert "dtype bfloat16 vs float32" in why and "head_dim 64 vs 128" in why
    assert "num_layers 2 vs 3" in why


GQA = KVLayout(1, "float32", 16, 3, 2)  # 2 KV heads of 16
MLA = KVLayout(1, "float32", 40, 3, 1, kind="mla", kv_lora_rank=32)  # latent 32 + rope 8


def test_kv_layout_mismatch_refuses_gqa_vs_mla_by_name() -> None:
    assert MLA.mismatch(MLA) is None and MLA.qk_rope_head_dim == 8
    for prefill, decode, names in ((GQA, MLA, "GQA vs MLA"), (MLA, GQA, "MLA vs GQA")):
        why = prefill.mismatch(decode)
        assert why is not None and why.startswith("KV layout mismatch (prefill vs decode)")
        assert f"attention kind {names}" in why, why
        assert "kv_lora_rank 32 + qk_rope_head_dim 8" in why and "2 KV heads" in why, why
        assert "same model" in why
    # the same latent width, split differently, is no match either
    other = KVLayout(1, "float32", 40, 3, 1, kind="mla", kv_lora_rank=24)
    why = MLA.mismatch(other)
    assert why is not None and "kv_lora_rank 32 vs 24" in why and "qk_rope_head_dim 8 vs 16" in why
    wider = KVLayout(1, "float32", 72, 3, 1, kind="mla", kv_lora_rank=64)
    why = MLA.mismatch(wider)
    assert why is not None and "latent width 40 vs 72" in why and "kv_lora_rank 32 vs 64" in why


@pytest.mark.parametrize("a_p", [1, 2, 4])
@pytest.mark.parametrize("a_d", [1, 2, 4])
def test_mla_latent_goes_whole_from_prefill_rank_0_to_every_decode_rank(a_p: int, a_d: int) -> None:
    """The latent plans as one KV head every rank holds: each decode rank gets all of it."""
    endpoints = [f"d{a}" for a in range(a_d)]
    plan = plan_targets(MLA.num_kv_heads, a_p, endpoints)
    assert plan[0] == [(e, [0]) for e in endpoints]
    assert all(plan[a] == [] for a in range(1, a_p))
    for a in range(a_d):
        assert expected_sources(MLA.num_kv_heads, a_p, a_d, a) == {0}
    assert all(kv_heads_of(MLA.num_kv_heads, a_p, a) == [0] for a in range(a_p))


def test_rank_info_carries_the_layout_kind() -> None:
    info = RankInfo(0, 1, 0, 2, "tcp://x:1", MLA)
    assert RankInfo.from_json(info.to_json()) == info
    old = info.to_json()  # a peer that registers without the kind is a GQA one
    old["kv"] = {k: v for k, v in old["kv"].items() if k not in ("kind", "kv_lora_rank")}
    assert RankInfo.from_json(old).kv.kind == "gqa"


def test_bootstrap_service_lists_ranks_once_all_registered() -> None:
    server = BootstrapServer(0, expected=2, host="127.0.0.1")
    try:
        kv = KVLayout(1, "float32", 16, 2, 2)
        register_rank("127.0.0.1", server.port, RankInfo(0, 1, 0, 2, "tcp://x:1", kv))
        assert fetch_ranks("127.0.0.1", server.port) is None  # one of two
        register_rank("127.0.0.1", server.port, RankInfo(0, 1, 1, 2, "tcp://x:2", kv))
        ranks = fetch_ranks("127.0.0.1", server.port)
        assert ranks is not None and [r.endpoint for r in ranks] == ["tcp://x:1", "tcp://x:2"]
        assert ranks[0].kv == kv
    finally:
        server.close()


def test_prebuilt_request_without_a_row_is_aborted(tiny_models: dict[str, Path]) -> None:
    """The base scheduler never indexes an unallocated row: such a request ends, aborted."""

    def fn(ps: ParallelState) -> None:
        runner = ModelRunner(RunnerConfig(str(tiny_models["llama"]), kv_pool_tokens=64), ps)
        sched = Scheduler(runner, SchedulerConfig(), eos_ids=set())
        free = runner.kv_pool.available_size()
        req = Req("r", [5, 6, 7], SamplingParams(max_new_tokens=4), 0, output_ids=[9])
        sched._process_prebuilt(ScheduleBatch(ForwardMode.PREBUILT, reqs=[req]))
        assert req.finish_reason is not None and req.finish_reason.value == "abort"
        assert sched.running == [] and runner.kv_pool.available_size() == free
        assert [o.finish_reason for o in sched.take_outputs()] == ["abort"]

    run_ranks(fn, Layout(1, 1), backend="thread")


def test_fake_backend_moves_nothing_and_frees_everything(tiny_models: dict[str, Path]) -> None:
    """Both sides on the fake transfer: no handshake, no KV; the decode side starts from the
    fake first token, and every pool and row comes back."""
    fake = {"disaggregation_transfer_backend": "fake"}
    specs = workload(seed=5, n=4)
    p_runs, d_runs = run_pd(tiny_models["llama"], (1, 1), (2, 2), specs, fake, fake)
    check_groups(p_runs, Layout(1, 1))
    check_groups(d_runs, Layout(2, 2))
    for s in specs:
        res = merged(d_runs)[s.rid]
        assert res.finish_reason == "length" and len(res.ids) == s.max_new_tokens
        assert res.ids[0] == FakeDecodeTransfer.FAKE_FIRST_TOKEN
