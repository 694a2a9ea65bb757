"""Gossip: entries, the push-pull exchange, convergence, expiry and goodbyes, in memory and over ZeroMQ."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
import zmq.asyncio

from corolla.bus.client import ConnectionPool
from corolla.bus.messages import GossipDigest, GossipEntries
from corolla.bus.server import RequestError, Server
from corolla.discovery.entry import EntryError, PeerEntry
from corolla.discovery.gossip import DIGEST_RECORD, BusTransport, GossipNode, peer_key
from corolla.discovery.memory import MemoryNetwork

from tests.discovery_helpers import entry


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_entry_wire_round_trip_and_validation():
    e = entry("abc", 3, 9, throughput=12.5, cache_tokens_free=77, adapters=("pirate",), max_length=4096,
              max_batch_size=8, version=4, heartbeat=11)
    back = PeerEntry.from_wire(e.to_wire(age_ms=1500), now=10.0)
    assert back.replace(heard_at=0.0) == e and back.heard_at == pytest.approx(8.5)
    wire = e.to_wire(0)
    older = {k: v for k, v in wire.items() if k not in ("ad", "ml", "mb")}  # a worker of before these were announced
    assert PeerEntry.from_wire(older, 0.0).replace(heard_at=0.0) == e.replace(adapters=(), max_length=0,
                                                                                max_batch_size=0)
    for bad in ({**wire, "start": 9}, {**wire, "end": 31}, {**wire, "ep": []}, {**wire, "hb": -1},
                {**wire, "tp": float("nan")}, {k: v for k, v in wire.items() if k != "ver"}, [1, 2],
                {**wire, "ad": "pirate"}, {**wire, "ad": [""]}, {**wire, "ad": [7]}, {**wire, "ad": ["x"] * 65},
                {**wire, "ml": -1}, {**wire, "mb": "8"}):
        with pytest.raises(EntryError):
            PeerEntry.from_wire(bad, 0.0)


class MemorySwarm:
    """n GossipNodes over the in-memory transport, stepped in virtual time, rounds in a random order."""

    def __init__(self, n: int, interval: float = 1.0, seed: int = 0):
        self.net, self.clock, self.interval = MemoryNetwork(), Clock(), interval
        self.rng = random.Random(seed)
        self.nodes: dict[str, GossipNode] = {}
        for i in range(n):
            self.add(f"p{i:02d}", seeds=["mem://p00"] if i else [])

    def add(self, peer_id: str, seeds: list[str]) -> GossipNode:
        transport = self.net.transport(f"mem://{peer_id}")
        node = GossipNode(transport, entry(peer_id, 0, 10, endpoint=f"mem://{peer_id}"), seeds=seeds,
                          interval=self.interval, clock=self.clock, rng=random.Random(self.rng.random()))
        transport.serve(node.handle)
        self.nodes[peer_id] = node
        return node

    def kill(self, peer_id: str) -> GossipNode:
        self.net.down.add(f"mem://{peer_id}")
        return self.nodes.pop(peer_id)

    async def round(self) -> None:
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for node in order:
            self.clock.t += self.interval / len(order)
            await node.gossip_round()

    def views(self) -> dict[str, set[str]]:
        return {pid: {e.peer_id for e in node.live()} for pid, node in self.nodes.items()}


def test_memory_swarm_converges_expires_and_says_goodbye():
    asyncio.run(_memory_swarm_converges_expires_and_says_goodbye())


async def _memory_swarm_converges_expires_and_says_goodbye():
    swarm = MemorySwarm(20)
    rounds = 0
    while any(len(v) < 20 for v in swarm.views().values()):
        await swarm.round()
        rounds += 1
        assert rounds <= 3, "20 peers joining through one seed converge in 3 rounds"
    assert all(node.ttl == 4 * swarm.interval for node in swarm.nodes.values())  # 3 rounds, + one for 20 peers

    newcomer = swarm.add("p99", seeds=["mem://p07"])  # any one live peer is enough
    for _ in range(3):
        await swarm.round()
    assert all("p99" in v for v in swarm.views().values())
    assert {e.peer_id for e in newcomer.live()} == set(swarm.views()["p00"])

    swarm.kill("p05")
    died = swarm.clock.t
    while any("p05" in v for v in swarm.views().values()):
        await swarm.round()
    assert swarm.clock.t - died <= swarm.nodes["p00"].ttl + swarm.interval  # the last heartbeat was < 1 round old

    await swarm.nodes["p06"].leave()
    swarm.kill("p06")
    await swarm.round()
    assert not any("p06" in v for v in swarm.views().values()), "a goodbye spreads within one round"

    for _ in range(10):  # long after: nothing comes back from the dead
        await swarm.round()
    views = swarm.views()
    assert all(v == set(swarm.nodes) for v in views.values()), views


def test_a_seed_whose_worker_expired_is_asked_again_until_it_is_back():
    asyncio.run(_a_seed_whose_worker_expired_is_asked_again())


async def _a_seed_whose_worker_expired_is_asked_again():
    """Workers started with no initial peers, and a client that lists them all: the client's pushes introduce the
    workers to each other, and its view keeps all three. One dies and expires everywhere, then comes back at the
    same address knowing no one: only the client can find it again, by asking its seed."""
    swarm = MemorySwarm(0)
    for name in ("a", "b", "c"):
        swarm.add(name, seeds=[])
    client = GossipNode(swarm.net.transport("mem://client"), seeds=[f"mem://{n}" for n in "abc"],
                        interval=swarm.interval, clock=swarm.clock, rng=random.Random(1))

    async def round_all():
        await swarm.round()
        await client.gossip_round()

    await round_all()
    for _ in range(60):
        await round_all()
        assert {e.peer_id for e in client.live()} == {"a", "b", "c"}
    swarm.kill("c")
    while "c" in {e.peer_id for e in client.live()}:
        await round_all()
    swarm.net.down.discard("mem://c")
    swarm.add("c", seeds=[])  # back at the same address
    for _ in range(2):
        await round_all()
    assert {e.peer_id for e in client.live()} == {"a", "b", "c"}


def test_heartbeats_only_travel_after_convergence():
    asyncio.run(_heartbeats_only_travel_after_convergence())


async def _heartbeats_only_travel_after_convergence():
    swarm = MemorySwarm(8)
    for _ in range(3):
        await swarm.round()
    before = swarm.net.messages
    await swarm.round()
    # 8 peers x 3 exchanges x (digest + answer); a push only when something is missing, so none now
    assert swarm.net.messages - before == 8 * 3 * 2
    swarm.nodes["p03"].update_self(start=10, end=20)
    await swarm.round()
    await swarm.round()
    assert all(n.table.export(n.table.index(peer_key("p03"))).span == (10, 20) for n in swarm.nodes.values())


def test_malformed_gossip_is_refused_without_harm():
    asyncio.run(_malformed_gossip_is_refused_without_harm())


async def _malformed_gossip_is_refused_without_harm():
    clock = Clock()
    node = GossipNode(MemoryNetwork().transport("mem://a"), entry("a", 0, 10), clock=clock)
    for bad in (torch.zeros(7, dtype=torch.uint8), torch.zeros(20, dtype=torch.float32), torch.zeros(2, 20, dtype=torch.uint8)):
        with pytest.raises(RequestError):
            await node.handle(GossipDigest(bad))
    await node.handle(GossipEntries(entries=[{"id": "x"}, {"nonsense": 1}, entry("b", 0, 5).to_wire(0)]))
    assert {e.peer_id for e in node.live()} == {"a", "b"}
    stale = entry("c", 0, 5).to_wire(age_ms=node.ttl * 1000 + 1)
    await node.handle(GossipEntries(entries=[stale]))
    assert not node.knows("c"), "news older than the TTL is never adopted"
    record = np.zeros(1, DIGEST_RECORD)
    record["key"], record["hb"] = peer_key("a"), 10**6
    await node.handle(GossipDigest(torch.from_numpy(record.view(np.uint8))))
    assert node.me.heartbeat < 10**6, "nobody but the owner moves its heartbeat"


class BusNode:
    """A GossipNode served on its own ROUTER socket on loopback, as a worker serves it."""

    def __init__(self, peer_id: str, seeds: list[str], interval: float):
        self.pool = ConnectionPool(zmq.asyncio.Context.instance())
        self.server = Server(lambda envelope: self.node.handle(envelope.message))
        self.node = GossipNode(BusTransport(self.pool, interval), entry(peer_id, 0, 10, endpoint=self.server.endpoint),
                               seeds=seeds, interval=interval)
        self.serving = asyncio.ensure_future(self.server.serve())
        self.node.start()

    async def kill(self) -> None:
        """Gone without a word, as with SIGKILL."""
        await self.node.stop()
        self.serving.cancel()
        self.server.close()
        await self.pool.close()


def test_five_peers_over_zeromq_converge_and_forget_a_dead_one():
    asyncio.run(_five_peers_over_zeromq_converge_and_forget_a_dead_one())


async def _five_peers_over_zeromq_converge_and_forget_a_dead_one():
    interval = 0.3
    nodes = [BusNode("w0", [], interval)]
    for i in range(1, 5):  # each joins through the previous one only
        nodes.append(BusNode(f"w{i}", [nodes[-1].server.endpoint], interval))

    async def all_see(n: int, among: list[BusNode]) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not all(len(x.node.live()) == n for x in among):
            await asyncio.sleep(0.02)
        return loop.time() - started

    try:
        converged = await asyncio.wait_for(all_see(5, nodes), 10 * interval)
        assert converged <= 5 * interval, f"converged in {converged / interval:.1f} rounds"
        dead, alive = nodes[2], nodes[:2] + nodes[3:]
        ttl = alive[0].node.ttl
        assert ttl == pytest.approx(3 * interval)
        await dead.kill()
        gone = await asyncio.wait_for(all_see(4, alive), 3 * ttl)
        assert gone <= ttl + 0.25, f"the dead peer lingered {gone:.2f} s, TTL {ttl:.2f} s"
        await alive[0].node.leave()  # a goodbye: gone from the others at once, not after a TTL
        alive[0].server.close()
        assert await asyncio.wait_for(all_see(3, alive[1:]), 3 * ttl) < 2 * interval
    finally:
        for x in nodes:
            await x.kill()
