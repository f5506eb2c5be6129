"""The ZMQ sockets of one rank's transfer: one bound PULL socket (its endpoint) and PUSH sockets
to peers, one per peer endpoint, so that messages to a peer keep their order."""

from __future__ import annotations

import zmq


class Sockets:
    """One bound PULL socket and cached PUSH sockets to peers' endpoints."""

    def __init__(self, host: str) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._push: dict[str, zmq.Socket] = {}

    def push(self, endpoint: str) -> zmq.Socket:
        sock = self._push.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # never block the rank loop on a slow peer
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
            self._push[endpoint] = sock
        return sock

    def incoming(self) -> list[list[bytes]]:
        frames = []
        while self.pull.poll(0):
            frames.append(self.pull.recv_multipart())
        return frames

    def close(self) -> None:
        for sock in [self.pull, *self._push.values()]:
            sock.close(linger=1000)
        self.ctx.term()
