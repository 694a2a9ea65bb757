"""Gossip at scale: the real GossipNode, thousands of them in one process, over an in-memory transport.

Every message goes through bus.wire.encode/decode (discovery/memory.py), so
the bytes counted are the bytes a socket would carry. Time is virtual: each
node runs a round every interval x U(0.9, 1.1) at its own phase, exactly as
GossipNode.run schedules it, and exchanges complete instantly.

Measured, per swarm size:

* bootstrap (sizes up to --bootstrap-max): every peer starts knowing one
  seed; rounds and seconds until every table holds every peer;
* from a converged swarm (pre-built tables for larger sizes, a few warm-up
  rounds first): bytes per peer per second; then at one instant a new peer
  joins through one random seed, one peer crashes and one says goodbye: how
  long until all views know the newcomer, and how long the departed linger;
* false expiries: live peers dropped by some view (must be 0).

Usage::

    python perf/sim_gossip.py --peers 1000 10000 [--interval 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from corolla.discovery import gossip
from corolla.discovery.entry import PeerEntry
from corolla.discovery.gossip import GossipNode, PeerTable, peer_key
from corolla.discovery.memory import MemoryNetwork

JITTER = gossip.INTERVAL_JITTER
WARMUP_ROUNDS = 3
MEASURE_ROUNDS = 3
MAX_EVENT_ROUNDS = 30


@dataclass
class Result:
    peers: int
    interval_s: float
    fanout: int
    ttl_s: float
    bootstrap_rounds: float | None
    bootstrap_s: float | None
    bytes_per_peer_s: float
    bytes_per_peer_s_max: float
    join_s: float
    crash_linger_s: float
    goodbye_linger_s: float
    false_expiries: int
    max_age_s: float  # the stalest heartbeat of a live peer in any view: the TTL must stay above it
    sim_wall_s: float


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ExpiryCounter(logging.Handler):
    """Counts 'peer X expired' events per peer id (GossipNode logs them)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.by_peer: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("peer %s (%s) expired"):
            self.by_peer[record.args[0]] = self.by_peer.get(record.args[0], 0) + 1


class Swarm:
    def __init__(self, n: int, interval: float, fanout: int, seed: int):
        self.interval, self.fanout = interval, fanout
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.net = MemoryNetwork()
        self.nodes: list[GossipNode] = []
        self.down: set[int] = set()
        self.queue: list[tuple[float, int]] = []
        for _ in range(n):
            self.add()

    def entry(self, i: int) -> PeerEntry:
        return PeerEntry(peer_id=f"{i:016x}", endpoints=(f"mem://{i}",), model="sim-model", start=(i * 8) % 72,
                         end=(i * 8) % 72 + 8, num_blocks=80, dtype="bfloat16", protocol=1, throughput=100.0,
                         cache_tokens_free=32768)

    def add(self, seeds: list[str] = (), at: float | None = None) -> int:
        i = len(self.nodes)
        transport = self.net.transport(f"mem://{i}")
        node = GossipNode(transport, self.entry(i), seeds=seeds, interval=self.interval, fanout=self.fanout,
                          clock=self.clock, rng=random.Random(self.rng.random()))
        transport.serve(node.handle)
        self.nodes.append(node)
        start = self.clock.t + self.rng.uniform(0, self.interval) if at is None else at
        heapq.heappush(self.queue, (start, i))
        return i

    def prebuild(self) -> None:
        """Give every node the converged table (fresh heartbeats of random phase), as if bootstrapped long ago."""
        entries = {peer_key(n.me.peer_id): n.me for n in self.nodes}
        base = PeerTable()
        base.upsert({k: e.replace(heard_at=self.clock.t - self.rng.uniform(0, self.interval)) for k, e in entries.items()})
        for node in self.nodes:
            t = node.table
            t.keys, t.ver, t.hb, t.heard, t.gone = (base.keys.copy(), base.ver.copy(), base.hb.copy(),
                                                    base.heard.copy(), base.gone.copy())
            t.entries = base.entries.copy()

    def crash(self, i: int) -> None:
        self.down.add(i)
        self.net.down.add(f"mem://{i}")

    async def run_until(self, t_end: float) -> None:
        while self.queue and self.queue[0][0] <= t_end:
            t, i = heapq.heappop(self.queue)
            if i in self.down:
                continue
            self.clock.t = t
            await self.nodes[i].gossip_round()
            heapq.heappush(self.queue, (t + self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER), i))
        self.clock.t = t_end

    def alive(self) -> list[GossipNode]:
        return [n for i, n in enumerate(self.nodes) if i not in self.down]


async def simulate(n: int, interval: float, fanout: int, bootstrap: bool, seed: int) -> Result:
    wall = time.perf_counter()
    counter = ExpiryCounter()
    glog = logging.getLogger(gossip.__name__)
    glog.addHandler(counter)
    glog.setLevel(logging.INFO)
    glog.propagate = False
    swarm = Swarm(n, interval, fanout, seed)
    boot_s = None
    if bootstrap:
        for node in swarm.nodes[1:]:
            node.add_seeds(["mem://0"])
        step = interval / 4
        while min(len(node.table) for node in swarm.nodes) < n:
            await swarm.run_until(swarm.clock.t + step)
        boot_s = swarm.clock.t
        print(f"  {n} peers: bootstrap from one seed converged in {boot_s:.1f} s "
              f"({boot_s / interval:.1f} rounds)", flush=True)
    else:
        swarm.prebuild()
    await swarm.run_until(swarm.clock.t + WARMUP_ROUNDS * interval)

    before, t0 = dict(swarm.net.bytes_sent), swarm.clock.t
    await swarm.run_until(t0 + MEASURE_ROUNDS * interval)
    window = swarm.clock.t - t0
    sent = np.array([swarm.net.bytes_sent[f"mem://{i}"] - before.get(f"mem://{i}", 0) for i in range(n)])
    per_peer = sent / window
    print(f"  {n} peers: {per_peer.mean() / 1e3:.1f} kB/s sent per peer (max {per_peer.max() / 1e3:.1f})",
          flush=True)

    crashed, leaver = swarm.rng.sample(range(1, n), 2)
    crashed_id, leaver_id = swarm.nodes[crashed].me.peer_id, swarm.nodes[leaver].me.peer_id
    t_event = swarm.clock.t
    joiner = swarm.add(seeds=[f"mem://{swarm.rng.randrange(n)}"], at=t_event)
    joiner_id = swarm.nodes[joiner].me.peer_id
    swarm.crash(crashed)
    await swarm.nodes[leaver].leave()
    swarm.crash(leaver)
    join_s = crash_s = bye_s = None
    max_age = 0.0
    departed = {peer_key(crashed_id), peer_key(leaver_id)}
    step = interval / 4
    while swarm.clock.t < t_event + MAX_EVENT_ROUNDS * interval and None in (join_s, crash_s, bye_s):
        await swarm.run_until(swarm.clock.t + step)
        alive = swarm.alive()
        elapsed = swarm.clock.t - t_event
        max_age = max(max_age, stalest(alive, departed, swarm.clock.t))
        if join_s is None and all(node.knows(joiner_id) for node in alive):
            join_s = elapsed
        if crash_s is None and not any(node.knows(crashed_id) for node in alive):
            crash_s = elapsed
        if bye_s is None and not any(node.knows(leaver_id) for node in alive):
            bye_s = elapsed
    false = sum(c for peer, c in counter.by_peer.items() if peer != crashed_id)
    glog.removeHandler(counter)
    ttl = swarm.nodes[0].ttl
    return Result(n, interval, fanout, ttl, None if boot_s is None else boot_s / interval, boot_s,
                  float(per_peer.mean()), float(per_peer.max()), _or_inf(join_s), _or_inf(crash_s), _or_inf(bye_s),
                  false, max_age, time.perf_counter() - wall)


def stalest(nodes: list[GossipNode], departed: set[int], now: float) -> float:
    worst = 0.0
    departed_keys = np.array(sorted(departed), np.uint64)
    for node in nodes:
        t = node.table
        live = ~t.gone & ~np.isin(t.keys, departed_keys)
        if live.any():
            worst = max(worst, float(np.max(now - t.heard[live])))
    return worst


def _or_inf(x: float | None) -> float:
    return float("inf") if x is None else x


def table(results: list[Result]) -> str:
    head = ("| peers | bootstrap (rounds / s) | bytes/peer/s | join seen by all | crashed peer lingers "
            "| goodbye lingers | TTL | stalest live heartbeat | false expiries |")
    rows = [head, "|" + "---|" * 9]
    for r in results:
        boot = "-" if r.bootstrap_s is None else f"{r.bootstrap_rounds:.1f} / {r.bootstrap_s:.1f} s"
        rows.append(f"| {r.peers:,} | {boot} | {r.bytes_per_peer_s / 1e3:.1f} kB/s | {r.join_s:.1f} s "
                    f"| {r.crash_linger_s:.1f} s | {r.goodbye_linger_s:.1f} s | {r.ttl_s:.0f} s | {r.max_age_s:.1f} s "
                    f"| {r.false_expiries} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--interval", type=float, default=gossip.DEFAULT_INTERVAL_S)
    parser.add_argument("--fanout", type=int, default=gossip.DEFAULT_FANOUT)
    parser.add_argument("--bootstrap-max", type=int, default=2000,
                        help="simulate bootstrap from one seed up to this many peers (it moves N^2 full entries)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    for n in args.peers:
        print(f"simulating {n} peers ...", flush=True)
        results.append(asyncio.run(simulate(n, args.interval, args.fanout, n <= args.bootstrap_max, args.seed)))
        print(f"  done in {results[-1].sim_wall_s:.0f} s of wall time", flush=True)
    print()
    print(f"gossip interval {args.interval:g} s, fanout {args.fanout}, virtual time")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
