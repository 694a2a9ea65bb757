"""A worker's membership of the swarm: choose blocks from what the swarm lacks, join, rebalance, leave.

Discovery itself (gossip, mDNS) lives in corolla.discovery; this module decides
what the worker does with it. A move to other blocks happens only while the
worker is idle: no open session, no request in flight. A worker with open
sessions defers the move and re-plans every second, so it never drops a
session; as long as clients keep sessions open on it (or until they expire
after `idle_timeout`), it stays where it is.
"""
from __future__ import annotations

import asyncio
import logging
import random

from corolla.bus import wire
from corolla.bus.security import Security
from corolla.discovery.entry import PeerEntry
from corolla.discovery.interfaces import order_endpoints
from corolla.discovery.presence import WorkerPresence
from corolla.discovery.view import SwarmView
from corolla.worker.block_selection import block_throughputs, choose_start, plan_move
from corolla.worker.config import WorkerConfig
from corolla.worker.respan import respan
from corolla.worker.throughput import measure_throughput

log = logging.getLogger(__name__)

FIRST_CHECK_ROUNDS = 3  # the first rebalance check comes this many gossip rounds after joining: fixes simultaneous starts
CHECK_JITTER = 0.25  # checks every interval x U(0.75, 1.25): workers that started together do not decide together
MOVE_POLL_S = 1.0  # while a move waits for open sessions to end


class SwarmMembership:
    """One per worker, on its event loop: choose_span() before loading, join() once bound, leave() on SIGTERM."""

    def __init__(self, config: WorkerConfig, model_id: str, num_blocks: int):
        self.config = config
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.view = SwarmView(order_endpoints)
        self.presence = WorkerPresence(self.view, config.initial_peers, config.mdns, config.interfaces or None,
                                       config.gossip_interval, bind_host=config.host, public_host=config.public_host,
                                       security=Security.from_file(config.swarm_key))
        self.rng = random.Random()
        self.service = self.server = None
        self._tasks: list[asyncio.Task] = []

    async def choose_span(self, n: int) -> tuple[int, int]:
        """The n blocks the swarm serves worst, after listening for it for up to `discovery_wait` seconds."""
        if self.config.initial_peers or self.presence.mdns:
            await self.presence.discover(self.config.discovery_wait)
        peers = self.view.peers(self.model_id)
        start = choose_start(block_throughputs(peers, self.num_blocks), n)
        log.info("the swarm has %d workers on %s; taking blocks %d:%d", len(peers), self.model_id, start, start + n)
        return start, start + n

    async def join(self, service, server) -> None:
        """Gossip and announce the worker; call before the server answers anything (a peer asking for gossip
        must never hear "unknown kind"). Re-checks the blocks periodically if the worker chose them."""
        self.service, self.server = service, server
        throughput = self.config.throughput or await asyncio.to_thread(
            measure_throughput, service.span, service.hidden_size, service.dtype, service.device)
        entry = PeerEntry(peer_id=service.peer_id, endpoints=(server.endpoint,), model=self.model_id,
                          start=service.start, end=service.end, num_blocks=self.num_blocks, dtype=self.config.dtype,
                          protocol=wire.PROTOCOL_VERSION, throughput=throughput,
                          cache_tokens_free=service.sessions.free_tokens,
                          adapters=tuple(service.adapter_names),
                          max_length=self.config.max_length, max_batch_size=self.config.max_batch_size)
        await self.presence.join(entry, server.endpoint, service)
        self._tasks.append(asyncio.ensure_future(self._report_cache()))
        self._tasks.append(asyncio.ensure_future(self._connect_onward()))
        # Adapters are injected into the loaded blocks; a move would serve new blocks without them.
        if self.config.span() is None and not service.adapters and self.config.rebalance_interval > 0:
            self._tasks.append(asyncio.ensure_future(self._rebalance()))

    async def leave(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.presence.leave()

    async def _report_cache(self) -> None:
        while True:
            await asyncio.sleep(self.config.gossip_interval)
            self.presence.update(cache_tokens_free=self.service.sessions.free_tokens)

    async def _connect_onward(self) -> None:
        """Keep push connections open to the workers that serve the block after this worker's span, as gossip
        finds them: a new chain's first push then leaves at once, without TCP's and ZeroMQ's handshakes (two round
        trips on a slow link). Lost connections to workers gone from the view are closed."""
        while True:
            end, peers = self.service.end, self.view.peers(self.model_id)
            for peer in peers:
                if peer.start <= end < peer.end and peer.num_blocks == self.num_blocks:
                    self.service.pusher.connect(peer.endpoint)
            await self.service.pusher.prune({endpoint for peer in peers for endpoint in peer.endpoints})
            await asyncio.sleep(self.config.gossip_interval)

    # ---- rebalancing -----------------------------------------------------------------------

    def _plan(self) -> int | None:
        me = self.presence.node.me
        return plan_move(self.view.peers(self.model_id), me, self.num_blocks)

    async def _rebalance(self) -> None:
        delay = FIRST_CHECK_ROUNDS * self.config.gossip_interval
        while True:
            await asyncio.sleep(delay * self.rng.uniform(1 - CHECK_JITTER, 1 + CHECK_JITTER))
            delay = self.config.rebalance_interval
            start = self._plan()
            if start is not None:
                try:
                    await self._move(start)
                except Exception:
                    log.exception("moving to blocks %d:... failed; staying", start)

    async def _move(self, start: int) -> None:
        service, n = self.service, self.service.end - self.service.start
        end = start + n
        log.info("blocks %d:%d are served far worse than %d:%d; loading them", start, end, service.start, service.end)
        span = await asyncio.to_thread(respan, service.span, self.config.model, start, end, self.config.torch_dtype,
                                       self.config.device)
        while True:
            if self._plan() != start:
                log.info("the swarm changed while loading; staying at %d:%d", service.start, service.end)
                return
            if not len(service.sessions) and not self.server.in_flight and not service.compute.pending():
                break
            await asyncio.sleep(MOVE_POLL_S)  # sessions are open: let them finish
        old = service.start, service.end
        service.span, service.start, service.end = span, start, end  # nothing can run between these checks and here
        self.presence.update(start=start, end=end)
        log.info("moved from blocks %d:%d to %d:%d", *old, start, end)
