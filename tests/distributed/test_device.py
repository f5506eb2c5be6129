"""Device and backend choice, GPU count checks and the group split (NCCL for the model's tensors,
gloo for the scheduler's metadata) — all decided before any process or NCCL group exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpattn.cli import main
from dpattn.config import EngineConfig, resolve_backend, resolve_device
from dpattn.distributed.device import GroupBackends, check_gpus, group_backends, rank_device
from dpattn.distributed.parallel_state import Layout, thread_parallel_state
from dpattn.distributed.thread_backend import ThreadWorld
from dpattn.runtime.launch import RankGroup

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize(
    "requested,has_cuda,expected",
    [(None, True, "cuda"), (None, False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda")],
)
def test_resolve_device(
    requested: str | None, has_cuda: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DPATTN_DEVICE", raising=False)
    assert resolve_device(requested, has_cuda) == expected


def test_dpattn_device_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPATTN_DEVICE", "cpu")  # what tests/conftest.py pins for the suite
    assert resolve_device(None, has_cuda=True) == "cpu"
    assert resolve_device("cuda", has_cuda=True) == "cuda"  # the flag wins
    monkeypatch.setenv("DPATTN_DEVICE", "cuda")
    with pytest.raises(ValueError, match="--device cuda"):
        resolve_device(None, has_cuda=False)


def test_cuda_without_cuda_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="--device cuda: .*no CUDA device.*--device cpu") as e:
        resolve_device("cuda", has_cuda=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--device must be one of"):
        resolve_device("tpu", has_cuda=True)


@pytest.mark.parametrize(
    "requested,device,expected",
    [(None, "cuda", "nccl"), (None, "cpu", "gloo"), ("thread", "cuda", "thread")]
    + [("thread", "cpu", "thread"), ("nccl", "cuda", "nccl"), ("gloo", "cpu", "gloo")],
)
def test_resolve_backend(requested: str | None, device: str, expected: str) -> None:
    assert resolve_backend(requested, device) == expected


def test_backend_device_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="--backend nccl needs --device cuda"):
        resolve_backend("nccl", "cpu")
    with pytest.raises(ValueError, match="gloo cannot carry CUDA tensors.*--backend thread"):
        resolve_backend("gloo", "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="the default is cuda where CUDA is available")
def test_engine_config_defaults_on_a_cpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPATTN_DEVICE", raising=False)
    cfg = EngineConfig.from_options("m", 2, 1)
    assert (cfg.device, cfg.backend) == ("cpu", "gloo")
    cfg = EngineConfig.from_options("m", 2, 2, backend="thread")
    assert (cfg.device, cfg.backend) == ("cpu", "thread")
    with pytest.raises(ValueError, match="--device cuda"):
        EngineConfig.from_options("m", device="cuda")


@pytest.mark.skipif(not NO_CUDA, reason="needs a host without CUDA")
def test_cli_device_cuda_without_cuda(
    tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", "--model-path", str(tiny_models["llama"]), "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpattn: error: --device cuda:") and "\n" not in err


def test_check_gpus() -> None:
    check_gpus("cuda", "nccl", 2, gpus=2)
    check_gpus("cuda", "thread", 4, gpus=1)  # threads share one GPU
    check_gpus("cpu", "gloo", 4, gpus=0)
    with pytest.raises(ValueError, match="4 rank processes on this host need 4 GPUs, found 1"):
        check_gpus("cuda", "nccl", 4, gpus=1)


def test_rank_device() -> None:
    assert rank_device("cuda", "nccl", 3) == torch.device("cuda", 3)
    assert rank_device("cuda", "thread", 3) == torch.device("cuda", 0)
    assert rank_device("cpu", "gloo", 3) == torch.device("cpu")


@pytest.mark.parametrize(
    "device,backend,expected",
    [
        ("cuda", "nccl", GroupBackends("nccl", "gloo", True)),  # SGLang's split
        ("cpu", "gloo", GroupBackends("gloo", "gloo", False)),
        ("cuda", "thread", GroupBackends("thread", "thread", False)),
        ("cpu", "thread", GroupBackends("thread", "thread", False)),
    ],
)
def test_group_split(device: str, backend: str, expected: GroupBackends) -> None:
    plan = group_backends(device, backend)
    assert plan == expected
    assert plan.capturable == (plan.model == "nccl")  # only NCCL collectives go in a graph


def test_rank_group_refuses_before_starting_anything() -> None:
    def never(ps: object) -> None:
        raise AssertionError("no rank may start")

    with pytest.raises(ValueError, match="gloo cannot carry CUDA tensors"):
        RankGroup(never, Layout(2, 1), "gloo", device="cuda")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="2 rank processes on this host need 2 GPUs"):
            RankGroup(never, Layout(2, 1), "nccl", device="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        RankGroup(never, Layout(1, 1), "mpi")


def test_thread_ranks_carry_their_device() -> None:
    world = ThreadWorld(2)
    ps = thread_parallel_state(world, Layout(2, 2), 1, "cpu")
    assert ps.device == torch.device("cpu")
    assert ps.world_cpu is ps.world and ps.attn_tp_cpu is ps.attn_tp  # one group serves both
    assert not ps.world.capturable and not ps.attn_tp.capturable


def test_request_table_follows_the_scheduler_cap() -> None:
    # the runner's request table needs a row per request the scheduler may run, default or not
    default = EngineConfig.from_options("m")
    assert default.runner.max_running_requests == default.scheduler.max_running_requests
    assert EngineConfig.from_options("m", max_running_requests=7).runner.max_running_requests == 7
