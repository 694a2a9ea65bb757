"""A worker's side of discovery: find the swarm, then join it, gossip and announce, and say goodbye.

A worker starts as an observer (it may need to know the swarm to choose its
blocks), and the same gossip node becomes a member once the worker serves:
it answers digests on the worker's ROUTER socket and beats its own entry.
"""
from __future__ import annotations

import asyncio
import logging

from corolla.bus.messages import GossipDigest, GossipEntries
from corolla.bus.security import Security
from corolla.discovery import interfaces as netif
from corolla.discovery.entry import PeerEntry
from corolla.discovery.gossip import DEFAULT_INTERVAL_S
from corolla.discovery.mdns import MdnsAnnouncer
from corolla.discovery.observer import SwarmObserver
from corolla.discovery.view import SwarmView

log = logging.getLogger(__name__)


class WorkerPresence:
    """Use on the worker's event loop."""

    def __init__(self, view: SwarmView, initial_peers: list[str] = (), mdns: bool = True,
                 interfaces: list[str] | None = None, interval: float = DEFAULT_INTERVAL_S,
                 bind_host: str | None = None, public_host: str | None = None, security: Security | None = None):
        self.view = view
        self.mdns = mdns and bool(interfaces or netif.announces_by_default(bind_host))
        self.public_host = public_host
        self.addresses = netif.resolve(interfaces, bind_host)
        self.observer = SwarmObserver(view, list(initial_peers), self.mdns, interfaces, interval, bind_host=bind_host,
                                      security=security)
        self.announcer: MdnsAnnouncer | None = None
        self._started = False
        self._tasks: set[asyncio.Task] = set()

    @property
    def node(self):
        return self.observer.node

    async def discover(self, timeout: float) -> None:
        """Listen for the swarm (gossip from the initial peers, mDNS) for at most `timeout` seconds."""
        await self._start()
        await self.observer.settled(timeout)

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self.observer.start()

    async def join(self, entry: PeerEntry, bound: str, service) -> PeerEntry:
        """Gossip `entry` (its endpoints derived from the bound endpoint) and announce it; serve gossip on `service`."""
        entry = entry.replace(endpoints=tuple(netif.announce_endpoints(bound, self.addresses, self.public_host)))
        self.node.become(entry)
        service.add_handler(GossipDigest, self.node.handle)
        service.add_handler(GossipEntries, self.node.handle)
        await self._start()
        if self.mdns:
            self.announcer = MdnsAnnouncer(entry, self.addresses)
            self._spawn(self._announce())
        log.info("joined the swarm as %s at %s", entry.peer_id, ", ".join(entry.endpoints))
        return entry

    async def _announce(self) -> None:
        try:
            await self.announcer.start()
        except Exception as e:  # no multicast on this host: gossip still carries the worker
            log.warning("mDNS announcement on %s failed (%s); peers must reach this worker by gossip",
                        self.addresses, e)
            self.announcer = None

    def update(self, **changes) -> None:
        """Change this worker's entry (span, throughput, free cache); gossip and mDNS carry the new version."""
        before = self.node.me
        self.node.update_self(**changes)
        after = self.node.me
        if self.announcer is not None and after.version != before.version and _announced(before) != _announced(after):
            self._spawn(self.announcer.update(after))

    async def leave(self) -> None:
        """Goodbye over gossip (a tombstone) and mDNS (unregister), then stop everything."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.node.leave()
        except Exception as e:
            log.warning("gossip goodbye failed: %s", e)
        if self.announcer is not None:
            await self.announcer.stop()
        await self.observer.stop()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _announced(entry: PeerEntry) -> tuple:
    """What the mDNS TXT record carries: re-announce only when that changes (not for free-cache updates)."""
    return entry.start, entry.end, entry.throughput
