"""An in-process gossip transport: real message encoding, no sockets, every byte counted.

perf/sim_gossip.py runs thousands of GossipNodes over it; tests use it for the
logic alone. Each request and reply goes through bus.wire.encode/decode, so
what is measured is what a socket would carry (less ZeroMQ's few framing bytes).
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from corolla.bus import wire
from corolla.bus.errors import RequestTimeout


class MemoryNetwork:
    """Endpoints -> handlers; a handler that is absent or marked down times out like a dead peer."""

    def __init__(self):
        self.handlers: dict[str, Any] = {}
        self.down: set[str] = set()
        self.bytes_sent: Counter[str] = Counter()  # by the endpoint that sent them
        self.messages = 0
        self._ids = itertools.count(1)

    def transport(self, endpoint: str) -> "MemoryTransport":
        """The transport of the node at `endpoint`; it serves requests once given a handler (`serve`)."""
        return MemoryTransport(self, endpoint)

    async def deliver(self, sender: str, endpoint: str, msg: Any) -> Any:
        request_id = next(self._ids)
        request = self._carry(sender, msg, request_id)
        handler = self.handlers.get(endpoint)
        if handler is None or endpoint in self.down or sender in self.down:
            raise RequestTimeout(endpoint, 0.0)
        reply = await handler(request)
        return self._carry(endpoint, reply, request_id)

    def _carry(self, sender: str, msg: Any, request_id: int) -> Any:
        frames = wire.encode(msg, request_id)
        self.bytes_sent[sender] += sum(len(f) for f in frames)
        self.messages += 1
        return wire.decode(frames).message


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, endpoint: str):
        self.network = network
        self.endpoint = endpoint

    def serve(self, handler) -> None:
        """Answer requests to this endpoint with `handler(msg) -> reply` (a GossipNode.handle)."""
        self.network.handlers[self.endpoint] = handler

    async def request(self, endpoint: str, msg: Any) -> Any:
        return await self.network.deliver(self.endpoint, endpoint, msg)

    def forget(self, endpoint: str) -> None:
        pass
