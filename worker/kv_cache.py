"""Inference sessions and the KV-cache budget they draw on.

A session reserves batch_size x max_length tokens of cache when it opens, so a
worker never admits more than its budget and cannot run out of memory mid-step;
a session that does not fit is refused at once with CACHE_FULL. A GPU worker's
slot pool (worker/slots.py) is carved out of the budget whole when the worker
starts: a session in one of its slots reserves nothing more. Idle sessions
expire so an abandoned client cannot hold the cache forever, and a closed or
expired session's slot goes back to the pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from corolla.bus.errors import ErrorCode
from corolla.bus.server import RequestError
from corolla.worker.slots import SlotSessionCache


@dataclass
class Session:
    session_id: str
    start: int  # global block indices this session runs
    end: int
    batch_size: int
    max_length: int
    cache: object  # transformers Cache of the span
    adapter: str = ""
    position: int = 0  # tokens already in the cache
    mask: torch.Tensor | None = None  # [batch, position] while any padding has been seen
    last_used: float = field(default_factory=time.monotonic)

    @property
    def pooled(self) -> bool:
        """Whether its cache is a slot of the worker's pool."""
        return isinstance(self.cache, SlotSessionCache)

    @property
    def reserved_tokens(self) -> int:
        return 0 if self.pooled else self.batch_size * self.max_length

    def release(self) -> None:
        if self.pooled:
            self.cache.release()


class SessionTable:
    def __init__(self, budget_tokens: int, idle_timeout: float, pool=None):
        self.budget_tokens = budget_tokens
        self.idle_timeout = idle_timeout
        self.pool = pool  # a SlotPool, whose slots x length tokens the budget holds from the start
        self._private = budget_tokens - (pool.slots * pool.length if pool else 0)
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def used_tokens(self) -> int:
        return sum(s.reserved_tokens for s in self._sessions.values())

    @property
    def free_tokens(self) -> int:
        """Tokens sessions could still reserve: the budget outside the pool, and the pool's free slots."""
        return self._private - self.used_tokens + (self.pool.free_slots * self.pool.length if self.pool else 0)

    def open(self, session: Session) -> None:
        self.expire()
        if session.session_id in self._sessions:
            raise RequestError(ErrorCode.SESSION_EXISTS, f"session {session.session_id} is already open")
        free = self._private - self.used_tokens
        if session.reserved_tokens > free:
            raise RequestError(ErrorCode.CACHE_FULL,
                               f"session needs {session.reserved_tokens} cache tokens, {free} of "
                               f"{self._private} are free")
        self._sessions[session.session_id] = session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise RequestError(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id!r} (closed, expired or never opened)")
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise RequestError(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id!r}")
        session.release()

    def expire(self) -> list[str]:
        now = time.monotonic()
        gone = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout]
        for sid in gone:
            self._sessions.pop(sid).release()
        return gone
