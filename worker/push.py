"""Server-to-server push: a worker sends its step output straight to the next worker of the chain.

With client-relayed hops every worker costs the client a round trip; with push
the hidden states travel client -> w1 -> w2 -> ... and the client's requests to
the later workers only wait for them, so a step costs about one one-way delay
per worker instead of two. The client still receives every output (it keeps
them to rebuild caches after a fault).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Collection

import torch

from corolla.bus import wire
from corolla.bus.client import ConnectionPool
from corolla.bus.errors import CorollaError, ErrorCode
from corolla.bus.messages import Push
from corolla.bus.server import RequestError

log = logging.getLogger(__name__)

MAX_WAITING = 4096  # pushes and waiting steps held at once; beyond it pushes are refused
PUSH_TIMEOUT = 30.0


class Mailbox:
    """Pushed hidden states by (session, position), meeting the client's step that waits for them."""

    def __init__(self, ttl: float = PUSH_TIMEOUT):
        self.ttl = ttl
        self.delivered = 0  # pushes received, reported in WorkerInfo.extra
        self._slots: dict[tuple[str, int], tuple[asyncio.Future, float]] = {}

    def _slot(self, key: tuple[str, int]) -> asyncio.Future:
        slot = self._slots.get(key)
        if slot is None:
            self._prune()
            if len(self._slots) >= MAX_WAITING:
                raise RequestError(ErrorCode.BUSY, "too many pushes waiting")
            slot = self._slots[key] = (asyncio.get_running_loop().create_future(), time.monotonic())
        return slot[0]

    def deliver(self, session_id: str, position: int, hidden: torch.Tensor) -> None:
        future = self._slot((session_id, position))
        self.delivered += 1
        if not future.done():
            future.set_result(hidden)

    def supersede(self, session_id: str, position: int) -> None:
        """The client sent this step's input itself: a step still waiting for the push gives up."""
        slot = self._slots.pop((session_id, position), None)
        if slot is not None and not slot[0].done():
            slot[0].set_exception(RequestError(ErrorCode.NO_INPUT, "superseded by a step that brought its input"))

    async def receive(self, session_id: str, position: int, timeout: float) -> torch.Tensor:
        key = (session_id, position)
        try:
            return await asyncio.wait_for(asyncio.shield(self._slot(key)), timeout)
        except asyncio.TimeoutError:
            raise RequestError(ErrorCode.NO_INPUT, f"no input pushed for position {position} within {timeout:g} s") \
                from None
        finally:
            self._slots.pop(key, None)

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, t) in self._slots.items() if now - t > self.ttl]:
            del self._slots[key]


class Pusher:
    """Sends step outputs to the next worker in the background; a failed push only costs that worker a wait."""

    def __init__(self, pool: ConnectionPool, timeout: float = PUSH_TIMEOUT):
        self.pool = pool
        self.timeout = timeout
        self._tasks: set[asyncio.Task] = set()

    def push(self, endpoint: str, session_id: str, position: int, hidden: torch.Tensor, codec: wire.Codec) -> None:
        task = asyncio.create_task(self._send(endpoint, Push(session_id, position, hidden), codec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def connect(self, endpoint: str) -> None:
        """Open the connection to a likely next worker now, so a chain's first push does not wait for handshakes."""
        self.pool.get(endpoint).start()

    async def prune(self, present: Collection[str]) -> None:
        """Close lost connections to workers no longer `present` (see ConnectionPool.prune)."""
        await self.pool.prune(present)

    @property
    def connected(self) -> int:
        """How many workers this one holds a live push connection to."""
        return self.pool.connected

    async def _send(self, endpoint: str, message: Push, codec: wire.Codec) -> None:
        try:
            await self.pool.get(endpoint).request(message, self.timeout, codec)
        except CorollaError as e:
            log.info("push to %s failed: %s", endpoint, e)
