"""Routing: shortest chains over block boundaries, filters, spreading, waiting for discovery, and real latency."""
from __future__ import annotations

import asyncio
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
import zmq.asyncio

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.errors import MissingBlocksError, RequestTimeout
from corolla.bus.messages import WorkerInfo
from corolla.client.routing import LATENCY, THROUGHPUT, Needs, StaticRouter, SwarmRouter, route
from corolla.discovery.view import SwarmView
from corolla.worker.launcher import LocalSwarm, stop_all

from tests.bus_helpers import EchoServer
from tests.discovery_helpers import WORKER_FLAGS, entry, free_port, infos, reference_tokens, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/ is a plain directory
from perf.relay import RelayThread  # noqa: E402


def hops_of(hops) -> list[tuple[str, int, int]]:
    return [(h.endpoint.split("//")[1].split(".")[0], h.start, h.end) for h in hops]


def cost_by(rtt: dict[str, float], block_s: float = 0.001, slower: dict[str, float] = {}):
    return lambda peer, blocks: rtt[peer.peer_id] + blocks * block_s * slower.get(peer.peer_id, 1.0)


def test_route_minimises_latency_over_overlapping_spans():
    peers = [entry("whole", 0, 30), entry("head", 0, 15), entry("tail", 15, 30)]
    hops, cost = route(peers, 0, 30, cost_by({"whole": 0.050, "head": 0.001, "tail": 0.001}))
    assert hops_of(hops) == [("head", 0, 15), ("tail", 15, 30)] and cost == pytest.approx(0.032)
    hops, _ = route(peers, 0, 30, cost_by({"whole": 0.050, "head": 0.100, "tail": 0.001}))
    assert hops_of(hops) == [("whole", 0, 30)]


def test_route_enters_spans_in_the_middle():
    peers = [entry("a", 0, 20), entry("b", 10, 30), entry("slow", 20, 30)]
    hops, _ = route(peers, 0, 30, cost_by({"a": 0.001, "b": 0.001, "slow": 0.5}, slower={"b": 2}))
    assert hops_of(hops) == [("a", 0, 20), ("b", 20, 30)]
    hops, _ = route(peers, 0, 30, cost_by({"a": 0.001, "b": 0.001, "slow": 0.5}, slower={"a": 2}))
    assert hops_of(hops) == [("a", 0, 10), ("b", 10, 30)]
    hops, _ = route(peers, 12, 18, cost_by({"a": 0.002, "b": 0.001, "slow": 0.5}))
    assert hops_of(hops) == [("b", 12, 18)]


def test_missing_blocks_are_named():
    with pytest.raises(MissingBlocksError) as e:
        route([entry("a", 0, 10), entry("b", 15, 25)], 0, 30, cost_by({"a": 0, "b": 0}), "m")
    assert e.value.missing == [(10, 15), (25, 30)] and "10:15, 25:30" in str(e.value)


def make_router(peers, mode=LATENCY, rtt=None, **kw) -> SwarmRouter:
    view = SwarmView()
    for p in peers:
        view.put("test", p)
    router = SwarmRouter(view, "m", 30, ConnectionPool(zmq.asyncio.Context.instance()), mode, **kw)
    router.rtt.rtt.update(rtt or {p.endpoint: 0.001 for p in peers})  # measured already: no pings
    return router


def chain(router: SwarmRouter, start=0, end=30, exclude=frozenset()):
    async def run():
        try:
            return await router.chain(start, end, exclude)
        finally:
            await router.close()
    return asyncio.run(run())


def test_allowed_blocked_and_excluded_servers():
    peers = [entry("fast", 0, 30), entry("head", 0, 15, throughput=10), entry("tail", 15, 30, throughput=10),
             entry("other-model", 0, 30, model="x"), entry("other-size", 0, 20, num_blocks=20)]
    assert hops_of(chain(make_router(peers))) == [("fast", 0, 30)]
    assert hops_of(chain(make_router(peers, blocked=["fast"]))) == [("head", 0, 15), ("tail", 15, 30)]
    assert hops_of(chain(make_router(peers, allowed=["head", peers[2].endpoint]))) == [("head", 0, 15), ("tail", 15, 30)]
    assert hops_of(chain(make_router(peers), exclude=frozenset({peers[0].endpoint}))) == [("head", 0, 15), ("tail", 15, 30)]
    with pytest.raises(MissingBlocksError) as e:
        chain(make_router(peers, blocked=["fast", "tail"], discovery_timeout=0.2))
    assert e.value.missing == [(15, 30)]


def needed_chain(router, needs, start=0):
    async def run():
        try:
            return await router.chain(start, 30, frozenset(), needs)
        finally:
            await router.close()
    return hops_of(asyncio.run(run()))


def test_a_session_is_routed_over_workers_with_cache_for_it_where_they_cover_its_blocks():
    peers = [entry("fast", 0, 30, throughput=1000, cache_tokens_free=100),
             entry("head", 0, 15, cache_tokens_free=5000), entry("tail", 15, 30, cache_tokens_free=5000)]
    assert hops_of(chain(make_router(peers))) == [("fast", 0, 30)]
    assert needed_chain(make_router(peers), Needs(1, 100)) == [("fast", 0, 30)]
    assert needed_chain(make_router(peers), Needs(2, 1024)) == [("head", 0, 15), ("tail", 15, 30)]
    assert needed_chain(make_router(peers), Needs(2, 1024), start=20) == [("tail", 20, 30)]
    assert needed_chain(make_router(peers), Needs(1, 9999)) == [("fast", 0, 30)]  # no one has room: the cheapest


def test_requests_with_an_adapter_are_routed_over_workers_serving_it():
    peers = [entry("fast", 0, 30, throughput=1000), entry("head", 0, 15, adapters=("pirate",)),
             entry("tail", 15, 30, adapters=("pirate", "ninja"), cache_tokens_free=5000),
             entry("tail-roomy", 15, 30, cache_tokens_free=5000)]
    assert needed_chain(make_router(peers), Needs()) == [("fast", 0, 30)]
    assert needed_chain(make_router(peers), Needs(adapter="pirate")) == [("head", 0, 15), ("tail", 15, 30)]
    # the adapter is required, room only preferred: no worker serving it has room for the session
    assert needed_chain(make_router(peers), Needs(1, 2048, "pirate")) == [("head", 0, 15), ("tail", 15, 30)]
    # no chain serves it: whichever chain is cheapest, whose worker refuses with UNKNOWN_ADAPTER naming its own
    assert needed_chain(make_router(peers), Needs(adapter="ninja")) == [("fast", 0, 30)]


def test_sessions_are_routed_over_workers_whose_limits_take_them():
    peers = [entry("fast", 0, 30, throughput=1000, max_length=2048, max_batch_size=8),
             entry("long", 0, 30, max_length=16384), entry("unknown", 0, 30, throughput=1)]
    assert needed_chain(make_router(peers), Needs(8, 2048)) == [("fast", 0, 30)]
    assert needed_chain(make_router(peers), Needs(1, 4096)) == [("long", 0, 30)]
    assert needed_chain(make_router(peers), Needs(16, 64)) == [("long", 0, 30)]  # no batch limit announced
    assert needed_chain(make_router(peers[:1] + peers[2:]), Needs(1, 4096)) == [("unknown", 0, 30)]


def test_a_hop_more_must_save_more_than_its_overhead():
    """Two halves computing 2% faster than one whole-model worker (within a shared machine's noise of throughput
    figures) do not win over it: a hop costs its hand-offs beyond the ping's round trip. Twice as fast, they do."""
    whole = entry("whole", 0, 30, throughput=1000)
    for halves_throughput, want in ((1020, [("whole", 0, 30)]), (2000, [("head", 0, 15), ("tail", 15, 30)])):
        peers = [whole, entry("head", 0, 15, throughput=halves_throughput),
                 entry("tail", 15, 30, throughput=halves_throughput)]
        assert hops_of(chain(make_router(peers, rtt={p.endpoint: 0.0003 for p in peers}))) == want


def test_throughput_mode_spreads_over_replicas_latency_mode_does_not():
    peers = [entry("r1", 0, 30), entry("r2", 0, 30), entry("slow", 0, 30, throughput=10)]

    def picks(mode):
        router = make_router(peers, mode)

        async def many():
            try:
                return Counter([hops_of(await router.chain(0, 30))[0][0] for _ in range(300)])
            finally:
                await router.close()
        return asyncio.run(many())

    spread = picks(THROUGHPUT)
    assert spread["r1"] > 90 and spread["r2"] > 90 and spread["slow"] == 0, spread
    assert len(picks(LATENCY)) == 1


def test_chain_waits_for_discovery_to_fill_a_gap():
    router = make_router([entry("head", 0, 15)], discovery_timeout=5.0)
    tail = entry("tail", 15, 30)
    router.rtt.rtt[tail.endpoint] = 0.001
    threading.Timer(0.3, router.view.put, ("test", tail)).start()  # found by "discovery" on another thread
    assert hops_of(chain(router)) == [("head", 0, 15), ("tail", 15, 30)]


def steps_connected(model, endpoints) -> bool:
    """Whether the connections the model's steps will use are up (handshakes done) to all of `endpoints`."""
    connections = model.remote_layers.pool._connections
    return all(e in connections and connections[e].connected for e in endpoints)


def test_a_static_router_asks_a_worker_again_after_a_failed_ask():
    """Spans are asked once, from measure() on; an ask that failed (the worker not up yet) is not kept."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bus = BusLoop.get()
    router = StaticRouter([endpoint], ConnectionPool(bus.context), "m", timeout=0.3)
    bus.loop.call_soon_threadsafe(router.measure)
    with pytest.raises(RequestTimeout):
        bus.run(router.chain(0, 4))
    assert not router.covers(0, 4, frozenset())

    async def info(envelope):
        return WorkerInfo("w", "m", 0, 4, 4, "float32", 1, 0, 0)

    server = EchoServer(handler=info, endpoint=endpoint)
    try:
        assert hops_of(bus.run(router.chain(0, 4))) == [("127", 0, 4)]
        assert router.covers(0, 4, frozenset())
    finally:
        router.close_soon()
        server.close()


@pytest.mark.slow
def test_a_client_pings_and_connects_to_workers_as_it_finds_them(tiny_llama_folder):
    """Round trips are measured as gossip names the workers, before any chain is asked for, so a user's first
    generate() need not wait for pings; callers waiting at once for the same worker's first measurement all get it.
    The steps' own connections open then too, so the first step does not wait for handshakes, and so does the
    first worker's push connection to the worker serving the block after its span. A worker gone from the swarm
    leaves no connection behind."""
    port = free_port()
    seed = ["--initial-peers", f"tcp://127.0.0.1:{port}"]
    args = [["--model", tiny_llama_folder, "--blocks", "0:2", "--port", str(port), *WORKER_FLAGS],
            ["--model", tiny_llama_folder, "--blocks", "2:4", *seed, *WORKER_FLAGS]]
    with LocalSwarm(args) as swarm:
        from corolla.client.model import AutoDistributedModelForCausalLM
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, dtype=torch.float32,
                                                                initial_peers=[swarm.endpoints[0]])
        router = model.remote_layers.router
        try:
            assert wait_until(lambda: set(router.rtt.rtt) == set(swarm.endpoints), 10), router.rtt.rtt
            assert all(0 < rtt < 0.5 for rtt in router.rtt.rtt.values())
            assert wait_until(lambda: steps_connected(model, swarm.endpoints), 10)
            pushing = lambda: [i.extra["push_peers_connected"] for i in infos(swarm.endpoints)]  # noqa: E731
            assert wait_until(lambda: pushing() == [1, 0], 10), pushing()
            rtts = dict(router.rtt.rtt)

            async def two_waiting():
                await asyncio.gather(router.rtt.ensure(["tcp://127.0.0.1:9"]), router.rtt.ensure(["tcp://127.0.0.1:9"]))
                return router.rtt.rtt == rtts and "tcp://127.0.0.1:9" in router.rtt.unreachable

            assert BusLoop.get().run(two_waiting())
            swarm.workers[1].process.kill()  # gone without a word: the steps' connection to it closes once the
            pool = model.remote_layers.pool  # view drops the worker, and the live one stays
            assert wait_until(lambda: swarm.endpoints[1] not in pool, 30)
            assert swarm.endpoints[0] in pool and pool.connected == 1
            assert wait_until(lambda: infos(swarm.endpoints[:1])[0].extra["push_peers_held"] == 0, 10)
        finally:
            BusLoop.get().run(router.close())
            stop_all(swarm.workers)


@pytest.mark.slow
def test_a_static_chain_is_asked_and_connected_while_the_client_loads(tiny_llama_folder):
    """A static chain's spans, round trips and connections are under way from from_pretrained on, not from the
    first step."""
    args = [["--model", tiny_llama_folder, "--blocks", span, *WORKER_FLAGS] for span in ("0:2", "2:4")]
    with LocalSwarm(args) as swarm:
        from corolla.client.model import AutoDistributedModelForCausalLM
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, dtype=torch.float32,
                                                                initial_peers=swarm.endpoints, routing="static")
        router = model.remote_layers.router
        try:
            assert wait_until(lambda: set(router.rtt.rtt) == set(swarm.endpoints), 10), router.rtt.rtt
            assert wait_until(lambda: steps_connected(model, swarm.endpoints), 10)
            assert router.covers(0, 4, frozenset()) and not router.covers(0, 4, frozenset(swarm.endpoints[1:]))
        finally:
            router.close_soon()
            stop_all(swarm.workers)


@pytest.mark.slow
def test_routing_prefers_the_low_latency_chain(tiny_llama_folder):
    """Three workers, each announced behind its own relay on 127.0.0.2-4: one serving all 4 blocks, two
    serving halves. Slow down the relay of the whole-model worker, and the client takes the two halves;
    slow down the first half's instead, and it takes the whole. Text is the local model's both times."""
    prompt, new = [1, 17, 42, 99], 6
    expected = reference_tokens(tiny_llama_folder, prompt, new)
    hosts = {"whole": "127.0.0.2", "head": "127.0.0.3", "tail": "127.0.0.4"}
    blocks = {"whole": "0:4", "head": "0:2", "tail": "2:4"}
    def args(name: str, *extra: str) -> list[str]:
        return ["--model", tiny_llama_folder, "--blocks", blocks[name], "--public-host", hosts[name],
                "--throughput", "1000", *WORKER_FLAGS, *extra]  # equal compute: latency alone decides

    port = free_port()  # the first worker's, so all three start at once: the others retry it until it answers
    seed = ["--initial-peers", f"tcp://127.0.0.1:{port}"]
    with LocalSwarm([args("whole", "--port", str(port)), args("head", *seed), args("tail", *seed)]) as swarm:
        ports = {n: int(w.endpoint.rsplit(":", 1)[1]) for n, w in zip(hosts, swarm.workers)}
        relays: dict[str, RelayThread] = {}

        def links(slow: str) -> None:
            for relay in relays.values():
                relay.stop()
            for n, host in hosts.items():
                relays[n] = RelayThread((host, ports[n]), ("127.0.0.1", ports[n]), delay_ms=25 if n == slow else 0)
                relays[n].start()

        def generate_through_swarm():
            from corolla.client.model import AutoDistributedModelForCausalLM
            model = AutoDistributedModelForCausalLM.from_pretrained(
                tiny_llama_folder, dtype=torch.float32, initial_peers=[f"tcp://{hosts['tail']}:{ports['tail']}"])
            router = model.remote_layers.router
            assert wait_until(lambda: len(router.view.peers()) == 3, 10), "the client learns all three by gossip"
            hops = BusLoop.get().run(router.chain(0, 4))
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0].tolist()
            BusLoop.get().run(router.close())
            names = {f"tcp://{host}:{ports[n]}": n for n, host in hosts.items()}
            return [(names[h.endpoint], h.start, h.end) for h in hops], out

        try:
            links(slow="whole")
            hops, out = generate_through_swarm()
            assert hops == [("head", 0, 2), ("tail", 2, 4)] and out == expected
            links(slow="head")
            hops, out = generate_through_swarm()
            assert hops == [("whole", 0, 4)] and out == expected
        finally:
            stop_all(swarm.workers)  # before the relays, so their goodbyes get through
            for relay in relays.values():
                relay.stop()

