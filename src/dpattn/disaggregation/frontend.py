"""The frontend's (Engine's) share of disaggregation: the prefill server's bootstrap service and
the DP group of a request (prefill: room % dp, so both servers can tell where it went)."""

from __future__ import annotations

import dataclasses
from typing import Any

from dpattn.config import EngineConfig
from dpattn.disaggregation.bootstrap import BootstrapServer
from dpattn.messages import BootstrapInfo


def start_bootstrap(cfg: EngineConfig) -> BootstrapServer | None:
    if cfg.disaggregation_mode != "prefill" or cfg.disaggregation_transfer_backend == "fake":
        return None
    # One host: the advertised address only (as the API binds 127.0.0.1 by default); several:
    # every interface, for the other nodes' ranks to register.
    host = "0.0.0.0" if cfg.nnodes > 1 else cfg.disaggregation_host
    return BootstrapServer(cfg.disaggregation_bootstrap_port, cfg.tp_size, host)


def disaggregation_dp_rank(
    cfg: EngineConfig, bootstrap: BootstrapInfo | None, dp_rank: int | None
) -> int | None:
    """The DP group a request must go to (None: the DP router's choice)."""
    mode = cfg.disaggregation_mode
    if mode == "null":
        return dp_rank
    if bootstrap is None:
        raise ValueError(
            f"this is a disaggregated {mode} server: requests need bootstrap_host, "
            "bootstrap_port and bootstrap_room (send them through `dpattn router --pd-disaggregation`)"
        )
    if mode == "prefill":
        return bootstrap.room % cfg.dp_size
    return dp_rank


def bootstrap_of(req: Any) -> BootstrapInfo | None:
    """The bootstrap fields of an HTTP request body; None unless all three are there (a
    disaggregated server then refuses the request, a colocated one never reads them)."""
    fields = (req.bootstrap_host, req.bootstrap_port, req.bootstrap_room)
    if any(f is None for f in fields):
        return None
    return BootstrapInfo(req.bootstrap_host, req.bootstrap_port, req.bootstrap_room)


def nth_room(bootstrap: BootstrapInfo | None, i: int) -> BootstrapInfo | None:
    """Engine request i of one HTTP request (n choices, a batch): its own room, which the
    prefill and the decode server derive alike."""
    if bootstrap is None:
        return None
    return dataclasses.replace(bootstrap, room=(bootstrap.room + i) % 2**63)
