"""Choosing the chain of workers that together run blocks [0, L).

Everything that needs a chain asks a Router; where the router learns about
workers (a static list now, discovery later) is its own business.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from corolla.bus.client import ConnectionPool
from corolla.bus.errors import CorollaError, MissingBlocksError
from corolla.bus.messages import InfoRequest, WorkerInfo


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on the worker at `endpoint`."""

    endpoint: str
    start: int
    end: int


class Router(Protocol):
    async def chain(self, start: int, end: int) -> list[Hop]: ...


class StaticRouter:
    """The peers the user listed, in order; each takes over where the previous one ends."""

    def __init__(self, endpoints: list[str], pool: ConnectionPool, model_id: str | None = None, timeout: float = 10.0):
        if not endpoints:
            raise CorollaError("no initial_peers given: list the workers' endpoints, e.g. tcp://127.0.0.1:31337")
        self.endpoints = list(endpoints)
        self.pool = pool
        self.model_id = model_id
        self.timeout = timeout
        self._infos: list[WorkerInfo] | None = None

    async def infos(self) -> list[WorkerInfo]:
        if self._infos is None:
            self._infos = list(await asyncio.gather(
                *(self.pool.get(e).request(InfoRequest(), self.timeout) for e in self.endpoints)))
        return self._infos

    async def chain(self, start: int, end: int) -> list[Hop]:
        hops, position = [], start
        for endpoint, info in zip(self.endpoints, await self.infos()):
            if position >= end:
                break
            if info.start <= position < info.end:
                hops.append(Hop(endpoint, position, min(info.end, end)))
                position = hops[-1].end
        if position < end:
            raise MissingBlocksError(self.model_id or "the model", [(position, end)])
        return hops
