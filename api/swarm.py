"""What the API knows of the swarm: discovery's SwarmView, plus an info probe of every worker for health and cache.

Gossip (from the initial peers) or mDNS fills the view; every PROBE_INTERVAL_S
each worker in it is asked for its WorkerInfo, which times the round trip,
shows whether it answers, and gives its cache budget (gossip carries only the
free part). Workers that do not answer count as absent, so `missing()` (and
with it /v1/models and the 503 of a request) reflects the chains a client can
actually build now. Everything runs on the client's bus loop; readers on other
threads see whole snapshots (dicts replaced, never mutated in place).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from corolla.bus.client import BusLoop
from corolla.bus.security import Security
from corolla.bus.messages import InfoRequest, WorkerInfo
from corolla.client.routing import uncovered
from corolla.discovery.entry import PeerEntry
from corolla.discovery.interfaces import order_endpoints
from corolla.discovery.observer import SwarmObserver
from corolla.discovery.view import SwarmView

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Probe:
    """The last info request to one worker: its answer and round trip, or None where it did not answer."""

    info: WorkerInfo | None
    rtt_s: float | None
    at: float  # time.time() of the answer or failure


class SwarmState:
    def __init__(self, initial_peers: list[str], mdns: bool, interfaces: list[str] | None = None,
                 bus: BusLoop | None = None, security: Security | None = None):
        self.bus = bus or BusLoop.get()
        self.security = security  # a private swarm's key, for gossip and info requests
        self.initial_peers = list(initial_peers)
        self.mdns = mdns
        self.interfaces = interfaces
        self.view = SwarmView(order_endpoints)
        self.observer: SwarmObserver | None = None
        self.probes: dict[str, Probe] = {}  # peer id -> last probe
        self._task: asyncio.Task | None = None

    def start(self, wait: float) -> None:
        """Join discovery and probe once; returns after at most `wait` s of listening (from a foreign thread)."""

        async def start() -> None:
            self.observer = SwarmObserver(self.view, self.initial_peers, mdns=self.mdns, interfaces=self.interfaces,
                                          context=self.bus.context, security=self.security)
            await self.observer.start()
            await self.observer.settled(wait)
            await self.probe_all()
            self._task = asyncio.ensure_future(self._probe_forever())

        self.bus.run(start())

    def stop(self) -> None:
        async def stop() -> None:
            if self._task is not None:
                self._task.cancel()
            if self.observer is not None:
                await self.observer.stop()

        self.bus.run(stop())

    # ---- probing, on the bus loop ---------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.probe_all()
            except Exception:
                log.exception("probing the swarm failed")

    async def probe_all(self) -> None:
        peers = self.view.peers()
        results = await asyncio.gather(*(self._probe(p) for p in peers))
        self.probes = {p.peer_id: r for p, r in zip(peers, results)}

    async def _probe(self, peer: PeerEntry) -> Probe:
        started = time.perf_counter()
        try:
            info = await self.observer.pool.get(peer.endpoint).request(InfoRequest(), PROBE_TIMEOUT_S)
        except Exception as e:
            log.debug("worker %s at %s did not answer: %s", peer.peer_id, peer.endpoint, e)
            return Probe(None, None, time.time())
        return Probe(info, time.perf_counter() - started, time.time())

    # ---- readers, any thread ----------------------------------------------------------------

    def healthy(self, peer: PeerEntry) -> bool:
        probe = self.probes.get(peer.peer_id)
        return probe is None or probe.info is not None  # not probed yet: trust discovery

    def serving(self, model: str, num_blocks: int) -> list[PeerEntry]:
        """The model's workers that answer."""
        return [p for p in self.view.peers(model) if p.num_blocks == num_blocks and self.healthy(p)]

    def missing(self, model: str, num_blocks: int) -> list[tuple[int, int]]:
        """Block ranges of `model` no answering worker serves; empty when a full chain exists."""
        return uncovered(self.serving(model, num_blocks), 0, num_blocks)

    def snapshot(self) -> dict:
        """The monitor's JSON: per model, block coverage and whether a full chain exists; per worker, its span,
        endpoint, throughput, cache, health, adapters and longest session (None: not announced)."""
        peers, probes = self.view.peers(), self.probes
        models = []
        for name in sorted({p.model for p in peers}):
            mine = [p for p in peers if p.model == name]
            num_blocks = max(p.num_blocks for p in mine)
            live = [p for p in mine if p.num_blocks == num_blocks and self.healthy(p)]
            gaps = uncovered(live, 0, num_blocks)
            models.append({
                "id": name, "num_blocks": num_blocks, "full_chain": not gaps, "missing": [list(g) for g in gaps],
                "coverage": [sum(p.serves(b) for p in live) for b in range(num_blocks)],
                "workers": [_worker_json(p, probes.get(p.peer_id)) for p in mine],
            })
        return {"time": time.time(), "models": models}


def _worker_json(peer: PeerEntry, probe: Probe | None) -> dict:
    info = probe.info if probe is not None else None
    cache_free = info.cache_tokens_free if info is not None else peer.cache_tokens_free
    cache_total = info.cache_tokens_total if info is not None else None
    return {
        "peer_id": peer.peer_id, "endpoint": peer.endpoint, "start": peer.start, "end": peer.end,
        "num_blocks": peer.num_blocks, "dtype": peer.dtype, "throughput": peer.throughput,
        "cache_tokens_free": cache_free, "cache_tokens_total": cache_total,
        "cache_tokens_used": None if cache_total is None else cache_total - cache_free,
        "adapters": list(peer.adapters), "max_length": peer.max_length or None,
        "health": "unknown" if probe is None else "ok" if info is not None else "unreachable",
        "rtt_ms": None if probe is None or probe.rtt_s is None else round(probe.rtt_s * 1000, 2),
    }
