"""KV slot pool: chunked free list (no whole-list copies) keeps every slot exactly once."""

from __future__ import annotations

import random

import torch

from dpattn.kvcache.memory_pool import KVPool, ReqToTokenPool


def test_alloc_free_keeps_every_slot_once() -> None:
    pool = KVPool(64, 1, 1, 2, torch.float32, torch.device("cpu"))
    rng = random.Random(0)
    held: list[torch.Tensor] = []
    for _ in range(500):
        if held and rng.random() < 0.5:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            slots = pool.alloc(rng.randint(1, 9))
            if slots is None:
                assert pool.available_size() < 9
                continue
            held.append(slots)
        in_use = torch.cat([torch.zeros(0, dtype=torch.int64), *held])
        everything = torch.cat([in_use, pool.free_slots()]).sort().values
        assert torch.equal(everything, torch.arange(64))
        assert pool.available_size() == 64 - in_use.numel()
    assert pool.alloc(65) is None


def test_req_to_token_rows_are_reused() -> None:
    rows = ReqToTokenPool(3, 8, torch.device("cpu"))
    got = [rows.alloc() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and rows.alloc() is None  # type: ignore[type-var]
    rows.free(got[1])  # type: ignore[arg-type]
    assert rows.alloc() == got[1] and rows.available_size() == 0
