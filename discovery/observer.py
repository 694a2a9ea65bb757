"""A process that serves no blocks (a client, `corolla swarm`, a worker still choosing its span) finding the swarm.

It pulls the gossip table from peers it knows (the initial peers, then any
peer in the table) and browses mDNS; both feed one SwarmView. Peers given as
initial peers that do not speak gossip still count: their InfoRequest answer
becomes their entry.
"""
from __future__ import annotations

import asyncio
import logging
import time

import zmq.asyncio

from corolla.bus.client import ConnectionPool
from corolla.bus.errors import ErrorCode, RemoteError
from corolla.bus.security import Security
from corolla.bus.messages import InfoRequest, WorkerInfo
from corolla.discovery import interfaces as netif
from corolla.discovery.entry import PeerEntry
from corolla.discovery.gossip import DEFAULT_INTERVAL_S, BusTransport, GossipNode
from corolla.discovery.mdns import MdnsBrowser
from corolla.discovery.view import SwarmView

log = logging.getLogger(__name__)

GOSSIP = "gossip"
MDNS = "mdns"
DIRECT = "direct"  # a peer that answered InfoRequest but not gossip
MDNS_SETTLE_S = 1.5  # mDNS answers arrive within ~0.5 s of the first query; allow for a lost one


def entry_from_info(info: WorkerInfo, endpoint: str) -> PeerEntry:
    return PeerEntry(peer_id=info.peer_id, endpoints=(endpoint,), model=info.model, start=info.start, end=info.end,
                     num_blocks=info.num_blocks, dtype=info.dtype, protocol=info.version, throughput=info.throughput,
                     cache_tokens_free=info.cache_tokens_free, adapters=tuple(info.adapters), heard_at=time.monotonic())


class SwarmObserver:
    """Create and use on one event loop (the client's bus loop, a worker's loop)."""

    def __init__(self, view: SwarmView, initial_peers: list[str] = (), mdns: bool = True,
                 interfaces: list[str] | None = None, interval: float = DEFAULT_INTERVAL_S,
                 context: zmq.asyncio.Context | None = None, bind_host: str | None = None,
                 security: Security | None = None):
        self.view = view
        self.pool = ConnectionPool(context or zmq.asyncio.Context.instance(), security)  # a private swarm's key
        self.transport = BusTransport(self.pool, timeout=interval)
        self.node = GossipNode(self.transport, seeds=initial_peers, interval=interval, listener=self._gossiped,
                               pick_endpoint=lambda endpoints: netif.order_endpoints(endpoints)[0],
                               on_error=self._gossip_failed)
        self.mdns_addresses = netif.resolve(interfaces, bind_host) if mdns else []
        self.browser = MdnsBrowser(self.mdns_addresses, self._found, self._lost) if mdns else None
        self._started = 0.0
        self._probed: set[str] = set()
        self._probes: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._started = time.monotonic()
        self.node.start()
        if self.browser is not None:
            try:
                await self.browser.start()
            except OSError as e:  # no multicast here: gossip alone still works
                log.warning("mDNS browsing on %s failed (%s); relying on gossip", self.mdns_addresses, e)
                self.browser = None

    async def settled(self, timeout: float) -> None:
        """Wait until the initial peers were asked once and mDNS had time to answer (at most `timeout` s)."""
        deadline = self._started + timeout
        try:
            await asyncio.wait_for(self.node.first_round.wait(), max(0.0, deadline - time.monotonic()))
            await asyncio.gather(*self._probes, return_exceptions=True)
        except asyncio.TimeoutError:
            return
        if self.browser is not None:
            await asyncio.sleep(max(0.0, min(deadline, self._started + MDNS_SETTLE_S) - time.monotonic()))

    async def stop(self) -> None:
        await self.node.stop()
        for task in list(self._probes):
            task.cancel()
        if self.browser is not None:
            await self.browser.stop()
        await self.pool.close()

    # ---- mDNS ------------------------------------------------------------------------------

    def _found(self, entry: PeerEntry) -> None:
        me = self.node.me
        if me is not None and entry.peer_id == me.peer_id:
            return  # a worker hears its own announcement
        self.view.put(MDNS, entry)
        self.node.add_seeds(entry.endpoints[:1])  # its gossip table may reach beyond this link

    def _lost(self, peer_id: str) -> None:
        self.view.drop(MDNS, peer_id)

    # ---- peers that do not gossip ----------------------------------------------------------

    def _gossiped(self, entries: list[PeerEntry]) -> None:
        self.view.replace(GOSSIP, entries)
        for entry in entries:  # a peer that answered info once now gossips: its gossip entry expires, keep that one
            self.view.drop(DIRECT, entry.peer_id)

    def _gossip_failed(self, endpoint: str, error: Exception) -> None:
        """An initial peer answering UNKNOWN_KIND does not gossip: ask what it serves, once, and keep trying gossip."""
        if (isinstance(error, RemoteError) and error.code == ErrorCode.UNKNOWN_KIND and endpoint in self.node.seeds
                and endpoint not in self._probed):
            self._probed.add(endpoint)
            task = asyncio.ensure_future(self._probe(endpoint))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, endpoint: str) -> None:
        try:
            info = await self.transport.request(endpoint, InfoRequest())
        except Exception as e:
            log.warning("initial peer %s answers neither gossip nor info: %s", endpoint, e)
            return
        log.info("initial peer %s does not gossip; using what it serves (%s %d:%d)", endpoint, info.model,
                 info.start, info.end)
        self.view.put(DIRECT, entry_from_info(info, endpoint))
