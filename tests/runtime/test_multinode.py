"""Multi-node launch: two 'hosts' on loopback (node 1 a separate `dpattn` process)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dpattn.entrypoints.engine import Engine
from dpattn.runtime.launch import free_port

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3]]


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free: the rendezvous takes p, the ZMQ sockets the next."""
    while True:
        port = free_port()
        socks = []
        try:
            for p in range(port, port + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


GREEDY = {"max_new_tokens": 6, "temperature": 0}


@pytest.mark.gloo
def test_two_nodes_match_one_node(tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["qwen3_moe"])
    with Engine(model, 1, 1, backend="thread") as engine:
        expected = [
            o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        ]
    addr = f"127.0.0.1:{free_port_block(4)}"  # rendezvous + 2 request sockets + outputs
    node_flags = ["--tp", "2", "--dp", "2", "--nnodes", "2", "--dist-init-addr", addr]
    follower = subprocess.Popen(
        [sys.executable, "-m", "dpattn.cli", "generate", "--model-path", model, *node_flags]
        + ["--node-rank", "1", "--prompt", "unused on node 1"]
    )
    try:
        with Engine(model, 2, 2, nnodes=2, node_rank=0, dist_init_addr=addr) as engine:
            outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        got = [o["output_ids"] for o in outs]
        assert [o["meta_info"]["dp_rank"] for o in outs] == [0, 1, 0]  # both hosts' groups served
        assert got == expected
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()


@pytest.mark.gloo
def test_pipeline_stage_per_node(tiny_models: dict[str, Path]) -> None:
    """--pp-size 2 --nnodes 2: stage 1 runs on the second 'host' (its ranks talk to the frontend
    only through stage 0); outputs equal one stage on one node."""
    model = str(tiny_models["qwen3_moe"])
    with Engine(model, 1, 1, backend="thread") as engine:
        expected = [
            o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        ]
    addr = f"127.0.0.1:{free_port_block(3)}"  # rendezvous + 1 request socket + outputs
    node_flags = ["--pp-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    follower = subprocess.Popen(
        [sys.executable, "-m", "dpattn.cli", "generate", "--model-path", model, *node_flags]
        + ["--node-rank", "1", "--prompt", "unused on node 1"]
    )
    try:
        with Engine(model, 1, 1, pp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr) as engine:
            outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert follower.wait(timeout=30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
