"""The frontend's (Engine's) share of disaggregation: the prefill server's bootstrap service, the
DP group of a request (prefill: room % dp, so both servers can tell where it went), and the
bootstrap fields of an HTTP request (one value, or lists as SGLang's router sends them) turned
into one (host, port, room) per engine request."""

from __future__ import annotations

from dataclasses import dataclass
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
    ranks = cfg.tp_size * cfg.pp_size  # every stage's ranks send their own layers' KV
    return BootstrapServer(cfg.disaggregation_bootstrap_port, ranks, host)


def disaggregation_dp_rank(
    cfg: EngineConfig, bootstrap: BootstrapInfo | None, dp_rank: int | None
) -> int | None:
    """The DP group a request must go to (None: the DP router's choice)."""
    mode = cfg.disaggregation_mode
    if mode == "null":
        return dp_rank
    if bootstrap is None:
        raise ValueError(
            f"this is a disaggregated {mode} server: requests need bootstrap_host and "
            "bootstrap_room, and bootstrap_port unless it is this server's "
            "--disaggregation-bootstrap-port (send them through `dpattn router "
            "--pd-disaggregation` or SGLang's router in PD mode)"
        )
    if mode == "prefill":  # whatever the method: the decode side finds the group so too
        return bootstrap.room % cfg.dp_size
    if dp_rank is None and cfg.router_policy == "follow_bootstrap_room":
        return bootstrap.room % cfg.dp_size
    return dp_rank


ROOM_SPACE = 2**64  # rooms are u64 (SGLang's router mints up to 2**64 - 1; SGLang up to 2**63)


@dataclass(frozen=True)
class BootstrapFields:
    """The bootstrap fields of one HTTP request body, as sent: each one value for every
    sequence, or a list (SGLang's router sends lists for batches and chat `n > 1`).

    `prompts`: how many prompts the body has; its sequences are prompt-major (prompt i's n
    choices at i * n .. i * n + n - 1), SGLang's order."""

    host: str | list[str]
    port: int | None | list[int | None]
    room: int | list[int]
    prompts: int | None = None

    def per_sequence(self, sequences: int, default_port: int) -> list[BootstrapInfo]:
        """Sequence k's (host, port, room), alike on the prefill and the decode server.

        A list has one entry per sequence, per prompt or per choice (n), or just one; a
        sequence takes its entry, and its room is offset so that no two sequences share one
        (the transfer is keyed by room): + choice j with an entry per prompt, + prompt i with an
        entry per choice, + k for a single room (SGLang's rule for a room given once). A null
        port is `default_port` (this server's --disaggregation-bootstrap-port), as in SGLang."""
        prompts = self.prompts or sequences
        if sequences % prompts:
            raise ValueError(f"{sequences} sequences do not split into {prompts} prompts")
        n = sequences // prompts
        out = []
        for k in range(sequences):
            h, _ = _entry("bootstrap_host", self.host, k, prompts, n)
            p, _ = _entry("bootstrap_port", self.port, k, prompts, n)
            r, offset = _entry("bootstrap_room", self.room, k, prompts, n)
            port = default_port if p is None else p
            if not isinstance(h, str) or not h:
                raise ValueError(f"bootstrap_host must be a host name, got {h!r}")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"bootstrap_port must be a port number or null, got {p!r}")
            if not isinstance(r, int) or not 0 <= r < ROOM_SPACE:
                raise ValueError(f"bootstrap_room must be an integer in [0, 2**64), got {r!r}")
            out.append(BootstrapInfo(h, port, (r + offset) % ROOM_SPACE))
        return out


def _entry(name: str, value: Any, k: int, prompts: int, n: int) -> tuple[Any, int]:
    """(the entry of sequence k = prompt i, choice j; the room offset that entry takes)."""
    if not isinstance(value, list):
        return value, k
    i, j = divmod(k, n)
    length = len(value)
    if length == prompts * n:
        return value[k], 0
    if length == prompts:
        return value[i], j
    if length == n:
        return value[j], i
    if length == 1:
        return value[0], k
    raise ValueError(
        f"{name} has {length} entries for {prompts * n} sequences ({prompts} prompts, n={n}): "
        "give one entry per sequence, per prompt or per choice, or a single value"
    )


def bootstrap_of(req: Any, prompts: int | None = None) -> BootstrapFields | None:
    """The bootstrap fields of an HTTP request body; None unless host and room are there (a
    disaggregated server then refuses the request, a colocated one never reads them). `prompts`:
    the body's prompt count (its sequences are prompts x n)."""
    if req.bootstrap_host is None or req.bootstrap_room is None:
        return None
    return BootstrapFields(req.bootstrap_host, req.bootstrap_port, req.bootstrap_room, prompts)


def per_sequence(
    cfg: EngineConfig, fields: BootstrapFields | None, sequences: int
) -> list[BootstrapInfo | None]:
    """Each engine request's bootstrap (None on a colocated server or without the fields, which
    a disaggregated server then refuses); ValueError for fields that do not fit the request."""
    if fields is None or cfg.disaggregation_mode == "null":
        return [None] * sequences
    return list(fields.per_sequence(sequences, cfg.disaggregation_bootstrap_port))
