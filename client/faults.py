"""What the client does when a worker fails: ban it for a while, back off, and ask routing again.

Shared by inference sessions (which then replay their history to rebuild the
lost caches) and by stateless forward/backward (which simply retry the hop).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from corolla.bus.errors import ErrorCode, RemoteError
from corolla.client.routing import Hop, Needs, Router

log = logging.getLogger(__name__)

#: Codes that say "this request was wrong", so another worker would refuse it too: never retried.
NOT_RETRYABLE = frozenset({ErrorCode.BAD_HEADER, ErrorCode.BAD_VERSION, ErrorCode.UNKNOWN_KIND, ErrorCode.BAD_FRAMES,
                           ErrorCode.BAD_TENSOR, ErrorCode.TOO_LARGE, ErrorCode.BAD_REQUEST, ErrorCode.BAD_SHAPE,
                           ErrorCode.BAD_VALUE, ErrorCode.OUT_OF_RANGE, ErrorCode.UNKNOWN_ADAPTER})


#: Codes of a healthy worker that is full right now: route elsewhere if anyone else serves its blocks, else wait
#: and retry it; never ban it for long.
BUSY = frozenset({ErrorCode.BUSY, ErrorCode.CACHE_FULL})
BUSY_AVOID_S = 5.0  # how long a full worker stays out of a client's new chains (while others can serve them)


def worth_retrying(error: Exception) -> bool:
    return isinstance(error, RemoteError) and error.code not in NOT_RETRYABLE


def blame(bans: "Bans", router, error: Exception, endpoint: str) -> None:
    """Keep the worker that caused `error` out of new chains: a failed one for the ban, its link's figure
    forgotten (it may be back restarted or moved, behind another link); a full one briefly, so the retry goes to
    a replica with room, where there is one."""
    if is_busy(error):
        bans.ban(endpoint, error, BUSY_AVOID_S)
    else:
        bans.ban(endpoint, error)
        router.links.forget(endpoint)


def is_busy(error: Exception) -> bool:
    return isinstance(error, RemoteError) and error.code in BUSY


@dataclass
class Bans:
    """Endpoints that failed recently, kept out of new chains until their ban lapses."""

    seconds: float = 30.0
    _until: dict[str, float] = field(default_factory=dict)

    def ban(self, endpoint: str, error: Exception, seconds: float | None = None) -> None:
        seconds = self.seconds if seconds is None else seconds
        self._until[endpoint] = max(self._until.get(endpoint, 0.0), time.monotonic() + seconds)
        log.log(logging.INFO if is_busy(error) else logging.WARNING, "avoiding %s for %.1f s after %s", endpoint,
                seconds, error)

    def current(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(e for e, t in self._until.items() if t > now)

    def lift(self, endpoint: str) -> None:
        self._until.pop(endpoint, None)


@dataclass
class Retry:
    """Bounded attempts with exponential back-off."""

    max_retries: int = 5
    backoff: float = 0.25
    max_backoff: float = 5.0
    attempt: int = 0

    async def next(self, error: Exception, wait: bool = True) -> None:
        """Count an attempt and wait (`wait`) before it, or raise `error` when attempts are exhausted."""
        if self.attempt >= self.max_retries:
            raise error
        delay = min(self.max_backoff, self.backoff * 2 ** self.attempt) if wait else 0.0
        self.attempt += 1
        log.info("attempt %d after %s; retrying in %.2f s", self.attempt, error, delay)
        await asyncio.sleep(delay)


async def retry_elsewhere(error: Exception, hop: Hop, bans: Bans, router: Router, retry: Retry) -> None:
    """After `hop` failed with a retryable `error`: keep its worker out of new chains and count an attempt, backing
    off only where no other worker covers the hop's blocks (a replica takes over at once). Raises `error` once the
    attempts are spent."""
    blame(bans, router, error, failed_endpoint(error, hop))
    await retry.next(error, wait=not router.covers(hop.start, hop.end, bans.current()))


async def reroute(router: Router, bans: Bans, start: int, end: int, needs: Needs = Needs()) -> list[Hop]:
    """A chain for [start, end) avoiding banned workers (offering what the request `needs`, see Router.chain);
    if only banned ones cover it, try them anyway
    (a restarted worker comes back at the same address)."""
    banned = bans.current()
    if banned and not router.covers(start, end, banned):
        banned = frozenset()
    return await router.chain(start, end, banned, needs)


def failed_endpoint(error: Exception, hop: Hop) -> str:
    return error.peer if isinstance(error, RemoteError) and error.peer else hop.endpoint
