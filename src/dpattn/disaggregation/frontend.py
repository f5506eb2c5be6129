"""The frontend's (Engine's) share of disaggregation: the prefill server's bootstrap service and
the DP group of a request (prefill: room % dp, so both servers can tell where it went)."""

from __future__ import annotations

from dpattn.config import EngineConfig
from dpattn.disaggregation.bootstrap import BootstrapServer
from dpattn.messages import BootstrapInfo


def start_bootstrap(cfg: EngineConfig) -> BootstrapServer | None:
    if cfg.disaggregation_mode != "prefill" or cfg.disaggregation_transfer_backend == "fake":
        return None
    return BootstrapServer(cfg.disaggregation_bootstrap_port, cfg.tp_size)


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
