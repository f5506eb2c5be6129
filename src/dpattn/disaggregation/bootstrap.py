"""The prefill server's bootstrap service: its ranks register, decode servers look them up.

A small threaded HTTP server in the prefill server's frontend process (port
--disaggregation-bootstrap-port). PUT /route registers one rank (RankInfo as JSON); GET /route
lists the registered ranks with the expected count; GET /health answers while the server lives
(decode servers use it as the prefill server's heartbeat).
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dpattn.disaggregation.layout import RankInfo


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: uvicorn logs the API
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self._reply(200, {"status": "ok"})
        elif self.path == "/route":
            with self.server.lock:
                ranks = [r.to_json() for _, r in sorted(self.server.ranks.items())]
            self._reply(200, {"expected": self.server.expected, "ranks": ranks})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_PUT(self) -> None:  # noqa: N802
        if self.path != "/route":
            self._reply(404, {"error": f"no route {self.path}"})
            return
        try:
            n = int(self.headers.get("Content-Length", 0))
            info = RankInfo.from_json(json.loads(self.rfile.read(n)))
        except (ValueError, TypeError, KeyError) as e:
            self._reply(400, {"error": f"bad registration: {e}"})
            return
        with self.server.lock:
            self.server.ranks[(info.pp_rank, info.dp_rank, info.attn_tp_rank)] = info
        self._reply(200, {"status": "registered"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], expected: int) -> None:
        super().__init__(addr, _Handler)
        self.lock = threading.Lock()
        self.ranks: dict[tuple[int, int, int], RankInfo] = {}  # (stage, dp, attn_tp) -> info
        self.expected = expected


class BootstrapServer:
    """Serves until close(); `expected` is the prefill server's number of ranks (P x T: every
    pipeline stage's ranks register, each with the layers it holds)."""

    def __init__(self, port: int, expected: int, host: str = "127.0.0.1") -> None:
        try:
            self._server = _Server((host, port), expected)
        except OSError as e:
            raise RuntimeError(f"bootstrap service cannot listen on {host}:{port}: {e}") from None
        self.port = int(self._server.server_address[1])
        self._closed = False
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def ranks(self) -> dict[tuple[int, int, int], RankInfo]:
        with self._server.lock:
            return dict(self._server.ranks)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()


def _url(host: str, port: int, path: str) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{path}"


def register_rank(host: str, port: int, info: RankInfo, timeout_s: float = 10.0) -> None:
    body = json.dumps(info.to_json()).encode()
    req = urllib.request.Request(_url(host, port, "/route"), body, method="PUT")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
    except OSError as e:
        raise RuntimeError(
            f"prefill rank cannot register with the bootstrap service at {host}:{port}: {e}"
        ) from None


def fetch_ranks(host: str, port: int, timeout_s: float = 2.0) -> list[RankInfo] | None:
    """The prefill server's ranks once all registered; None while some are missing.
    Raises OSError when the service does not answer."""
    with urllib.request.urlopen(_url(host, port, "/route"), timeout=timeout_s) as resp:
        body = json.loads(resp.read())
    ranks = [RankInfo.from_json(r) for r in body["ranks"]]
    return ranks if len(ranks) == body["expected"] else None


def is_alive(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(_url(host, port, "/health"), timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
