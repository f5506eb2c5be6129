"""The per-stage KV hand-off of a prefill server with pipeline stages, over the real zmq transfer
and bootstrap service (no model): the handshake reaches stage 0 only and the later stage adopts
it, each stage sends its own layers under their global index, and the decode side completes a
request only once every stage's KV and aux are in; a stage that fails fails the request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dpattn.disaggregation.bootstrap import BootstrapServer, register_rank
from dpattn.disaggregation.layout import KVLayout, RankInfo, stage_coverage
from dpattn.disaggregation.states import KVPoll
from dpattn.disaggregation.transfer_zmq_decode import ZmqDecodeTransfer
from dpattn.disaggregation.transfer_zmq_prefill import ZmqPrefillTransfer
from dpattn.disaggregation.wire import KVAux
from dpattn.kvcache.memory_pool import KVPool
from dpattn.messages import BootstrapInfo

LAYERS, HEADS, DIM, TOKENS = 4, 2, 8, 5
LAYOUT = KVLayout(1, "float32", DIM, LAYERS, HEADS)
STAGES = [(0, 1), (1, 4)]  # stage 0: layer 0; stage 1: layers 1..3
ROOM = 12345


class OneRankGroup:
    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


def prefill_ps(stage: int) -> Any:
    return SimpleNamespace(
        dp_rank=0, dp_size=1, attn_tp_rank=0, attn_tp_size=1, pp_rank=stage, pp_size=2
    )


@dataclass
class Pair:
    server: BootstrapServer
    stages: list[ZmqPrefillTransfer]
    pools: list[KVPool]  # each stage's pool: its layers only, filled with known values
    decode: ZmqDecodeTransfer
    decode_pool: KVPool
    slots: torch.Tensor  # decode slots reserved for the request


def pool(layers: int) -> KVPool:
    return KVPool(16, layers, HEADS, DIM, torch.float32, torch.device("cpu"))


@pytest.fixture
def pair() -> Iterator[Pair]:
    server = BootstrapServer(0, len(STAGES))
    stages = [
        ZmqPrefillTransfer(prefill_ps(s), LAYOUT, "127.0.0.1", span)
        for s, span in enumerate(STAGES)
    ]
    pools = [pool(end - start) for start, end in STAGES]
    for (start, _), p in zip(STAGES, pools):
        for i, (k, v) in enumerate(zip(p.k, p.v)):  # KV value = global layer, +0.5 for V
            k.fill_(start + i)
            v.fill_(start + i + 0.5)
    for t in stages:
        register_rank("127.0.0.1", server.port, t.info())
    ps = SimpleNamespace(attn_tp_rank=0, attn_tp_size=1, attn_tp_cpu=OneRankGroup())
    decode_pool = pool(LAYERS)
    decode = ZmqDecodeTransfer(ps, decode_pool, LAYOUT, "127.0.0.1", 0.1)  # type: ignore[arg-type]
    slots = torch.tensor([3, 4, 5, 6, 7])
    decode.start(BootstrapInfo("127.0.0.1", server.port, ROOM), slots)
    try:
        yield Pair(server, stages, pools, decode, decode_pool, slots)
    finally:
        decode.close()
        for t in stages:
            t.close()
        server.close()


def poll_until(fn: Any, want: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while (got := fn()) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def handshake(pair: Pair) -> list[KVPoll]:
    """The decode side sends it from its poll, once the look-up found every stage's rank."""

    def step() -> list[KVPoll]:
        pair.decode.poll([ROOM])
        return pair.stages[0].poll_bootstrap([ROOM])

    return poll_until(step, [KVPoll.WaitingForInput])  # type: ignore[no-any-return]


def aux() -> KVAux:
    return KVAux(ROOM, 0, 0, 42, -0.5)


def test_each_stage_sends_its_layers_and_decode_waits_for_all(pair: Pair) -> None:
    first, later = pair.stages
    assert handshake(pair) == [KVPoll.WaitingForInput]
    assert later.poll_bootstrap([ROOM]) == [KVPoll.Bootstrapping]  # stage 0 only gets it
    later.adopt(ROOM, first.handshake(ROOM))  # what the lane's decision carries
    src = torch.arange(TOKENS)
    for t, p in zip(pair.stages, pair.pools):
        t.send_kv(ROOM, p, src[:2], 0)  # two chunks each
        t.send_kv(ROOM, p, src[2:], 2)
    first.send_aux(ROOM, aux())
    time.sleep(0.2)
    assert pair.decode.poll([ROOM]) == [KVPoll.Transferring]  # stage 1's aux still missing
    later.send_aux(ROOM, aux())
    assert poll_until(lambda: pair.decode.poll([ROOM]), [KVPoll.Success]) == [KVPoll.Success]
    assert pair.decode.aux(ROOM).first_token == 42
    for layer in range(LAYERS):  # every layer landed at its global index, in the right slots
        assert (pair.decode_pool.k[layer][pair.slots] == layer).all()
        assert (pair.decode_pool.v[layer][pair.slots] == layer + 0.5).all()
        assert (pair.decode_pool.k[layer][:3] == 0).all()
    assert [t.poll_sent([ROOM]) for t in pair.stages] == [[KVPoll.Success]] * 2


def test_a_stage_that_fails_fails_the_request_on_the_decode_side(pair: Pair) -> None:
    first, later = pair.stages
    assert handshake(pair) == [KVPoll.WaitingForInput]
    later.adopt(ROOM, first.handshake(ROOM))
    src = torch.arange(TOKENS)
    first.send_kv(ROOM, pair.pools[0], src, 0)
    first.send_aux(ROOM, aux())
    later.send_kv(ROOM, pair.pools[1], src[:2], 0)
    later.send_aux(ROOM, aux())  # 2 of 5 tokens: the stage fails and tells the decode side
    assert later.poll_sent([ROOM]) == [KVPoll.Failed]
    assert poll_until(lambda: pair.decode.poll([ROOM]), [KVPoll.Failed]) == [KVPoll.Failed]
    assert "prefill sent 2" in pair.decode.reason(ROOM)


def test_stage_coverage_names_missing_or_overlapping_layers() -> None:
    def info(stage: int, span: tuple[int, int], size: int = 2) -> RankInfo:
        return RankInfo(0, 1, 0, 1, "tcp://x:1", LAYOUT, stage, size, *span)

    assert stage_coverage([info(0, (0, 1)), info(1, (1, 4))]) is None
    assert stage_coverage([RankInfo(0, 1, 0, 1, "tcp://x:1", LAYOUT)]) is None  # no stages
    gap = stage_coverage([info(0, (0, 1)), info(1, (2, 4))])
    assert gap is not None and "exactly one stage" in gap
    missing = stage_coverage([info(0, (0, 1))])  # stage 1 never registered
    assert missing is not None and "2 stage(s)" in missing
