"""Choosing the chain of workers that together run blocks [start, end).

Everything that needs a chain asks a Router. `StaticRouter` follows a list of
workers in the user's order; `SwarmRouter` routes over a SwarmView (gossip,
mDNS) as a shortest path over block boundaries: a hop runs blocks [a, b) on
one worker whose span contains them (so chains may enter a span in its middle
and spans may overlap), and costs

* latency mode (inference): the worker's measured RTT + HOP_OVERHEAD_S +
  (b - a) x its per-block compute time (1 / announced throughput); the chain
  minimises the expected time per token;
* throughput mode (stateless forward/backward): the same cost, times a
  random factor in [1, 1 + THROUGHPUT_SPREAD) drawn per worker and request,
  so concurrent requests spread over replicas of similar speed.

RTTs come from the bus's Ping, measured before a worker is first used (for a
static chain: in the background, as nothing routes by them) and refreshed in the
background on the bus loop. Beside them, a LinkMeter measures each worker's
bandwidth when the client first sends it activations, again once the figure is
LINK_MAX_AGE_S old, and afresh after the worker failed, so ClientConfig.codec
"auto" can choose their codec per link (compression/policy.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from corolla.bus import wire
from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.errors import CorollaError, MissingBlocksError, RequestTimeout
from corolla.bus.messages import InfoRequest, Ping, Probe, WorkerInfo
from corolla.bus.security import Security
from corolla.compression import policy
from corolla.discovery.entry import PeerEntry
from corolla.discovery.view import SwarmView

log = logging.getLogger(__name__)

LATENCY = "latency"
THROUGHPUT = "throughput"
STATIC = "static"  # the user's own chain (StaticRouter), chosen in client/model.py
MODES = (LATENCY, THROUGHPUT)
THROUGHPUT_SPREAD = 0.5
PING_TIMEOUT_S = 2.0
PING_SAMPLES = 3  # the first ping of a new connection also pays for the TCP handshake: keep the fastest
RTT_REFRESH_S = 10.0
RTT_SMOOTHING = 0.3  # weight of a new sample in the running RTT estimate
UNREACHABLE_RTT_S = 10.0  # a worker that did not answer a ping: used only if nothing else covers its blocks
# What a hop costs beyond its ping's round trip and its compute: the worker's hand-off to its compute thread and the
# activations' encoding, and the client's relay. Measured ~0.5 ms a hop on a 2-core CPU VM and ~0.8 ms of host time
# a step on an H100 worker (perf/RESULTS.md). Without it, a chain with a hop more would win on a measured compute
# time a few percent faster, within the noise of the workers' throughput figures on a shared machine.
HOP_OVERHEAD_S = 0.001
UNKNOWN_BLOCK_S = 0.005  # per-block compute time when no worker announces a throughput
VIEW_POLL_S = 0.5  # while waiting for discovery to fill a gap
PROBE_START_BYTES = 64 << 10
PROBE_MAX_BYTES = 4 << 20
# Probes grow 4x until the echo's transfer takes this long, so timer noise and a shaper's initial burst
# (tbf lets 50 kB through unshaped at 100 Mbit/s) are a few percent of it: about 0.3 s in all at 100 Mbit/s.
PROBE_TARGET_S = 0.05
PROBE_TIMEOUT_S = 5.0  # a probe still unanswered bounds the bandwidth from above; no measurement waits longer
LINK_MAX_AGE_S = 300.0  # links change (congestion, a moved worker): an older figure is measured again


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on the worker at `endpoint`."""

    endpoint: str
    start: int
    end: int


@dataclass(frozen=True)
class Needs:
    """What a chain's workers must offer beyond its blocks: an inference session's batch and length within each
    worker's limits, the adapter served (required), and room in its cache for the session (preferred)."""

    batch_size: int = 0  # 0, 0: a stateless pass, no session
    max_length: int = 0
    adapter: str = ""  # "": the base model

    @property
    def cache_tokens(self) -> int:
        return self.batch_size * self.max_length

    def met_by(self, peer: PeerEntry) -> bool:
        """Whether `peer` serves the adapter and takes the session (as far as it announces: 0 is unknown)."""
        return ((not self.adapter or self.adapter in peer.adapters)
                and (not peer.max_length or self.max_length <= peer.max_length)
                and (not peer.max_batch_size or self.batch_size <= peer.max_batch_size))


class Router(Protocol):
    links: "LinkMeter"

    async def chain(self, start: int, end: int, exclude: frozenset[str] = frozenset(),
                    needs: Needs = Needs()) -> list[Hop]:
        """Workers for [start, end), less `exclude`, that offer what the request `needs` where routing knows it."""

    def covers(self, start: int, end: int, exclude: frozenset[str]) -> bool:
        """Whether workers known right now, less `exclude`, cover [start, end) (no waiting for discovery)."""

    def round_trip(self, endpoint: str) -> float | None:
        """Measured round-trip time to a worker in seconds, or None until one is measured."""

    def measure(self) -> None:
        """Start learning the workers (spans, RTTs) and connecting to them in the background; on the bus loop."""

    def close_soon(self) -> None:
        """Stop the background work, from any thread."""


class StaticRouter:
    """The peers the user listed, in order; each takes over where the previous one ends.

    From `measure()` (or the first chain) on, their spans are asked and their RTTs (for `round_trip`, which
    decides server-to-server push) pinged in the background, then refreshed like a SwarmRouter's; nothing waits for
    the pings, as a static chain does not route by them. The pool is the steps' own, so their connections are up
    before the first step."""

    def __init__(self, endpoints: list[str], pool: ConnectionPool, model_id: str | None = None, timeout: float = 10.0):
        if not endpoints:
            raise CorollaError("no initial_peers given: list the workers' endpoints, e.g. tcp://127.0.0.1:31337")
        self.endpoints = list(endpoints)
        self.pool = pool
        self.model_id = model_id
        self.timeout = timeout
        self.links = LinkMeter(pool)
        self.rtt = RttTracker(pool)
        self._infos: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def infos(self) -> list[WorkerInfo]:
        """The workers' spans, asked once (a failed ask is asked again by the next caller)."""
        if self._infos is None or _failed(self._infos):
            self._infos = asyncio.ensure_future(asyncio.gather(
                *(self.pool.get(e).request(InfoRequest(), self.timeout) for e in self.endpoints)))
            self._infos.add_done_callback(_retrieved)  # whoever waited for it may be gone (exit, a cancelled step)
        return list(await asyncio.shield(self._infos))

    def measure(self) -> None:
        """Ask the workers' spans and ping them from now on; on the bus loop."""
        if self._pinger is None:
            self._loop = asyncio.get_running_loop()
            self._pinger = asyncio.ensure_future(self._ping())

    def close_soon(self) -> None:
        """Stop the RTT pings from any thread (a model's finalizer calls this)."""
        if self._pinger is not None:
            self._loop.call_soon_threadsafe(self._pinger.cancel)

    def round_trip(self, endpoint: str) -> float | None:
        return self.rtt.rtt.get(endpoint)

    async def _ping(self) -> None:
        with contextlib.suppress(Exception):  # the first chain's own ask reports it
            await self.infos()
        await self.rtt.ensure(self.endpoints)
        await self.rtt.refresh(lambda: self.endpoints)

    def covers(self, start: int, end: int, exclude: frozenset[str]) -> bool:
        answered = self._infos is not None and self._infos.done() and not _failed(self._infos)
        infos = self._infos.result() if answered else []
        return not uncovered([i for e, i in zip(self.endpoints, infos) if e not in exclude], start, end)

    async def chain(self, start: int, end: int, exclude: frozenset[str] = frozenset(),
                    needs: Needs = Needs()) -> list[Hop]:
        """The listed workers in order, whatever the request needs (a full one's refusal reroutes; one without
        the adapter refuses the request)."""
        self.measure()
        hops, position = [], start
        for endpoint, info in zip(self.endpoints, await self.infos()):
            if position >= end:
                break
            if endpoint not in exclude and info.start <= position < info.end:
                hops.append(Hop(endpoint, position, min(info.end, end)))
                position = hops[-1].end
        if position < end:
            raise MissingBlocksError(self.model_id or "the model", [(position, end)])
        return hops


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _failed(future: asyncio.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


# ---- the shortest chain ----------------------------------------------------------------------


def suited(peers: list[PeerEntry], needs: Needs, start: int, end: int) -> list[PeerEntry]:
    """The peers to route [start, end) over: those that meet `needs` with room for the cache (gossip's figure may be
    a round old: a worker full after all refuses, and a session routes around it), else those that meet them, else
    all (a worker then refuses what it cannot do, and says why), whichever first cover the blocks."""
    able = [p for p in peers if needs.met_by(p)]
    roomy = [p for p in able if p.cache_tokens_free >= needs.cache_tokens]
    return next((group for group in (roomy, able) if not uncovered(group, start, end)), peers)


def uncovered(peers: Iterable[PeerEntry | WorkerInfo], start: int, end: int) -> list[tuple[int, int]]:
    """Runs of blocks in [start, end) that no peer serves."""
    served = set()
    for p in peers:
        served.update(range(max(p.start, start), min(p.end, end)))
    gaps: list[tuple[int, int]] = []
    for b in range(start, end):
        if b in served:
            continue
        if gaps and gaps[-1][1] == b:
            gaps[-1] = (gaps[-1][0], b + 1)
        else:
            gaps.append((b, b + 1))
    return gaps


def route(peers: Sequence[PeerEntry], start: int, end: int, hop_cost: Callable[[PeerEntry, int], float],
          model: str = "the model") -> tuple[list[Hop], float]:
    """Cheapest chain of hops over [start, end) and its cost; `hop_cost(peer, blocks)`.

    Dijkstra over block boundaries. Costs are linear in blocks within a peer, so
    switching workers only pays at some span's start or end: those are the nodes.
    """
    points = sorted({start, end} | {x for p in peers for x in (p.start, p.end) if start < x < end})
    best = {start: 0.0}
    came: dict[int, tuple[int, PeerEntry]] = {}
    heap = [(0.0, start)]
    while heap:
        cost, pos = heapq.heappop(heap)
        if pos == end:
            break
        if cost > best[pos]:
            continue
        for peer in peers:
            if not peer.start <= pos < peer.end:
                continue
            for q in points:
                if q <= pos or q > min(peer.end, end):
                    continue
                c = cost + hop_cost(peer, q - pos)
                if c < best.get(q, math.inf):
                    best[q] = c
                    came[q] = (pos, peer)
                    heapq.heappush(heap, (c, q))
    if end not in best:
        raise MissingBlocksError(model, uncovered(peers, start, end))
    hops, pos = [], end
    while pos != start:
        prev, peer = came[pos]
        hops.append(Hop(peer.endpoint, prev, pos))
        pos = prev
    return hops[::-1], best[end]


# ---- RTTs ------------------------------------------------------------------------------------


class RttTracker:
    """Round-trip times to workers, from Ping; runs on the bus loop."""

    def __init__(self, pool: ConnectionPool, timeout: float = PING_TIMEOUT_S):
        self.pool = pool
        self.timeout = timeout
        self.rtt: dict[str, float] = {}
        self.unreachable: set[str] = set()
        self._measuring: dict[str, asyncio.Task] = {}  # first measurements in flight

    def get(self, endpoint: str) -> float:
        return UNREACHABLE_RTT_S if endpoint in self.unreachable else self.rtt.get(endpoint, UNREACHABLE_RTT_S)

    async def ping(self, endpoint: str, samples: int = 1) -> None:
        """The fastest of `samples` pings. The first of a new connection also pays for its handshakes, so the rest
        go together after it: a client's first chain waits two round trips for them, not `samples`."""
        connection = self.pool.get(endpoint)

        async def once() -> float:
            started = time.perf_counter()
            await connection.request(Ping(), self.timeout)
            return time.perf_counter() - started

        try:
            first = await once()
            best = min([first, *await asyncio.gather(*(once() for _ in range(samples - 1)))])
        except Exception as e:
            log.info("worker %s did not answer a ping: %s", endpoint, e)
            self.unreachable.add(endpoint)
            return
        self.unreachable.discard(endpoint)
        old = self.rtt.get(endpoint)
        self.rtt[endpoint] = best if old is None else (1 - RTT_SMOOTHING) * old + RTT_SMOOTHING * best

    async def ensure(self, endpoints: Iterable[str]) -> None:
        """Measure workers never measured (the fastest of a few pings, concurrently), joining measurements already
        in flight; a caller cancelled while it waits leaves them running for the others."""
        new = [e for e in dict.fromkeys(endpoints) if e not in self.rtt and e not in self.unreachable]
        await asyncio.gather(*(asyncio.shield(self._first_measurement(e)) for e in new))

    def _first_measurement(self, endpoint: str) -> asyncio.Task:
        task = self._measuring.get(endpoint)
        if task is None:
            task = self._measuring[endpoint] = asyncio.ensure_future(self.ping(endpoint, PING_SAMPLES))
            task.add_done_callback(lambda _: self._measuring.pop(endpoint, None))
        return task

    async def refresh(self, endpoints: Callable[[], Iterable[str]]) -> None:
        while True:
            await asyncio.sleep(RTT_REFRESH_S)
            await asyncio.gather(*(self.ping(e) for e in dict.fromkeys(endpoints())))


# ---- bandwidth and the activation codec per link ------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A worker's link as the client measured it: round trip and bandwidth (bytes/s each way; inf: too fast to
    measure)."""

    rtt_s: float
    bandwidth: float


class LinkMeter:
    """Each worker's Link: the fastest of a few Pings, then Probe echoes of growing size; bandwidth = bytes echoed
    both ways / (echo time - ping time). Measured on first use, which waits for it; again once the figure is older
    than `max_age_s`, in the background, uses going on with the old figure until the new one lands (a link that
    could not be measured is retried so too); afresh on the next use after `forget`. Runs on the bus loop, one link
    at a time so measurements do not share the client's own uplink."""

    def __init__(self, pool: ConnectionPool, timeout: float = PROBE_TIMEOUT_S, max_age_s: float = LINK_MAX_AGE_S):
        self.pool = pool
        self.timeout = timeout
        self.max_age_s = max_age_s
        self.links: dict[str, Link | None] = {}  # None: could not be measured (old worker, fault): raw
        self.measured_at: dict[str, float] = {}  # time.monotonic() when each figure landed
        self._measuring: dict[str, asyncio.Task] = {}
        self._one_at_a_time: asyncio.Lock | None = None

    async def get(self, endpoint: str) -> Link | None:
        if endpoint in self.links:
            if time.monotonic() - self.measured_at[endpoint] > self.max_age_s:
                self._measurement(endpoint)
            return self.links[endpoint]
        # shielded: a cancelled step leaves the measurement running for the next one
        return await asyncio.shield(self._measurement(endpoint))

    def forget(self, endpoint: str) -> None:
        """Drop `endpoint`'s figure and disown a measurement under way: its worker failed and may be back
        restarted or moved, so the next use measures the link afresh."""
        self.links.pop(endpoint, None)
        self.measured_at.pop(endpoint, None)
        self._measuring.pop(endpoint, None)

    def _measurement(self, endpoint: str) -> asyncio.Task:
        """The measurement of `endpoint` under way, started if there is none."""
        task = self._measuring.get(endpoint)
        if task is None:
            task = self._measuring[endpoint] = asyncio.ensure_future(self._measure(endpoint))
        return task

    async def codec(self, config, payload: torch.Tensor | None, *endpoints: str) -> wire.Codec:
        """How activations like `payload` travel over the links to `endpoints` (the slowest one decides) under
        `config` (a ClientConfig): an explicit codec as configured, "auto" as compression/policy.py chooses."""
        if config.codec != policy.AUTO:
            return config.activation_codec
        if payload is None:
            return wire.Codec("raw", config.wire_dtype)
        links = [await self.get(e) for e in endpoints]
        bandwidth = min((link.bandwidth for link in links if link is not None), default=None)
        itemsize = (config.wire_dtype or payload.dtype).itemsize
        return wire.Codec(policy.choose(bandwidth, payload.numel(), itemsize), config.wire_dtype)

    async def _measure(self, endpoint: str) -> Link | None:
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        async with self._one_at_a_time:
            try:
                link = await self._echoes(endpoint)
            except CorollaError as e:
                log.info("link to %s not measured (%s): activations go raw", endpoint, e)
                link = None
        if self._measuring.get(endpoint) is asyncio.current_task():  # not forgotten meanwhile
            self.links[endpoint] = link
            self.measured_at[endpoint] = time.monotonic()
            del self._measuring[endpoint]
        log.debug("link to %s: %s", endpoint, link)
        return link

    async def _echoes(self, endpoint: str) -> Link:
        connection = self.pool.get(endpoint)

        async def timed(msg) -> float:
            started = time.perf_counter()
            await connection.request(msg, self.timeout)
            return time.perf_counter() - started

        rtt = min([await timed(Ping()) for _ in range(PING_SAMPLES)])
        size = PROBE_START_BYTES
        while True:
            try:
                transfer = await timed(Probe(torch.randint(0, 256, (size,), dtype=torch.uint8))) - rtt
            except RequestTimeout:
                transfer = self.timeout
            if transfer >= PROBE_TARGET_S or size >= PROBE_MAX_BYTES:
                return Link(rtt, 2 * size / transfer if transfer > 0 else math.inf)
            size *= 4


# ---- the router --------------------------------------------------------------------------------


class SwarmRouter:
    """Chains over whatever the SwarmView knows of `model_id`; use from the bus loop."""

    def __init__(self, view: SwarmView, model_id: str, num_blocks: int, pool: ConnectionPool, mode: str = LATENCY,
                 allowed: Iterable[str] = (), blocked: Iterable[str] = (), discovery_timeout: float = 10.0,
                 observer=None, rng: random.Random | None = None, bus: BusLoop | None = None,
                 connections: ConnectionPool | None = None):
        if mode not in MODES:
            raise CorollaError(f"routing must be one of {', '.join(MODES)}, not {mode!r}")
        self.view = view
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.mode = mode
        self.allowed = frozenset(allowed)
        self.blocked = frozenset(blocked)
        self.discovery_timeout = discovery_timeout
        self.observer = observer
        self.bus = bus
        self.connections = connections  # the steps' own (pings and gossip keep theirs, never queued behind steps)
        self.rng = rng or random.Random()
        self.rtt = RttTracker(pool)
        self.links = LinkMeter(pool)
        self._refresher: asyncio.Task | None = None  # pings workers as they are found, and refreshes their RTTs
        self._closing: asyncio.Future | None = None  # close() once a finalizer asked for it
        self._changed = asyncio.Event()  # for chain(), waiting for missing blocks
        self._found = asyncio.Event()  # for the refresher
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe = view.subscribe(self._on_view_change)

    @classmethod
    def connect(cls, config, model_id: str, num_blocks: int, bus: BusLoop,
                connections: ConnectionPool | None = None) -> "SwarmRouter":
        """Find the swarm as `config` (a ClientConfig) says: gossip from initial_peers, else mDNS; a private
        swarm's key (`swarm_key`) secures gossip and pings. Workers are pinged, and `connections` (the steps')
        opened to them, as they are found."""
        from corolla.discovery.interfaces import order_endpoints
        from corolla.discovery.observer import SwarmObserver

        if not config.initial_peers and not config.mdns:
            raise CorollaError("no initial_peers given and mDNS is off: there is no way to find the swarm")

        security = Security.from_file(config.swarm_key)

        async def start() -> SwarmRouter:
            view = SwarmView(order_endpoints)
            observer = SwarmObserver(view, config.initial_peers, mdns=not config.initial_peers,
                                     interfaces=config.interfaces or None, context=bus.context, security=security)
            await observer.start()
            router = cls(view, model_id, num_blocks, observer.pool, config.routing, config.allowed_servers,
                         config.blocked_servers, config.discovery_timeout, observer, bus=bus,
                         connections=connections)
            router.measure()  # while weights load and the user writes a prompt: the first chain need not wait
            return router

        return bus.run(start())

    def _on_view_change(self, _view: SwarmView) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._changed.set)
            self._loop.call_soon_threadsafe(self._found.set)

    def measure(self) -> None:
        """Ping workers from now on, as discovery finds them, and refresh their RTTs; on the bus loop. The steps'
        connections to them open too, so a first step does not wait for TCP's and ZeroMQ's handshakes."""
        if self._refresher is None:
            self._loop = asyncio.get_running_loop()
            self._refresher = asyncio.ensure_future(self._measure())

    async def _measure(self) -> None:
        refreshing = asyncio.ensure_future(self.rtt.refresh(lambda: [p.endpoint for p in self.candidates()]))
        try:
            while True:
                self._found.clear()
                endpoints = [p.endpoint for p in self.candidates()]
                if self.connections is not None:
                    for endpoint in endpoints:
                        self.connections.get(endpoint).start()
                    await self.connections.prune(endpoints)
                await self.rtt.ensure(endpoints)
                await self._found.wait()
        finally:
            refreshing.cancel()

    def candidates(self, exclude: frozenset[str] = frozenset()) -> list[PeerEntry]:
        """The model's workers the user allows and this chain does not exclude."""

        def named(peer: PeerEntry, names: frozenset[str]) -> bool:
            return peer.peer_id in names or any(e in names for e in peer.endpoints)

        return [p for p in self.view.peers(self.model_id)
                if p.num_blocks == self.num_blocks and p.protocol in (0, wire.PROTOCOL_VERSION)
                and (not self.allowed or named(p, self.allowed)) and not named(p, self.blocked)
                and not named(p, exclude)]

    def hop_cost(self, peers: Sequence[PeerEntry]) -> Callable[[PeerEntry, int], float]:
        known = [p.throughput for p in peers if p.throughput > 0]
        default_block_s = 1 / statistics.median(known) if known else UNKNOWN_BLOCK_S
        spread = {p.peer_id: 1 + THROUGHPUT_SPREAD * self.rng.random() for p in peers} if self.mode == THROUGHPUT else {}

        def cost(peer: PeerEntry, blocks: int) -> float:
            block_s = 1 / peer.throughput if peer.throughput > 0 else default_block_s
            return (self.rtt.get(peer.endpoint) + HOP_OVERHEAD_S + blocks * block_s) * spread.get(peer.peer_id, 1.0)

        return cost

    def covers(self, start: int, end: int, exclude: frozenset[str]) -> bool:
        return not uncovered(self.candidates(exclude), start, end)

    def round_trip(self, endpoint: str) -> float | None:
        return self.rtt.rtt.get(endpoint)

    async def chain(self, start: int, end: int, exclude: frozenset[str] = frozenset(),
                    needs: Needs = Needs()) -> list[Hop]:
        """The cheapest chain over [start, end) of the workers that offer what the request `needs` (`suited`);
        waits up to discovery_timeout for missing blocks to appear."""
        self.measure()
        deadline = time.monotonic() + self.discovery_timeout
        while True:
            self._changed.clear()
            peers = self.candidates(exclude)
            await self.rtt.ensure(p.endpoint for p in peers)
            try:
                hops, cost = route(suited(peers, needs, start, end), start, end, self.hop_cost(peers), self.model_id)
            except MissingBlocksError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                try:
                    await asyncio.wait_for(self._changed.wait(), min(left, VIEW_POLL_S))
                except asyncio.TimeoutError:
                    pass
                continue
            log.debug("chain for %s %d:%d (%.1f ms): %s", self.model_id, start, end, cost * 1000,
                      [(h.endpoint, h.start, h.end) for h in hops])
            return hops

    def close_soon(self) -> None:
        """Stop discovery and RTT refreshes from any thread (a model's finalizer calls this). The coroutine is made
        on the loop itself: at interpreter exit the loop has stopped, and one made here would never be awaited."""
        if self.bus is not None:
            self.bus.loop.call_soon_threadsafe(self._close_on_loop)

    def _close_on_loop(self) -> None:
        self._closing = asyncio.ensure_future(self.close())

    async def close(self) -> None:
        self._unsubscribe()
        if self._refresher is not None:
            self._refresher.cancel()
        if self.observer is not None:
            await self.observer.stop()
