"""Link measurements that follow the network: a LinkMeter's figures age and are measured again in the background,
a restarted worker's link is measured afresh, and a static chain measures its round trips so it pushes over slow
links. Real workers and real ZeroMQ sockets on loopback; delay from perf/relay.py."""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.bus.messages import InfoRequest
from corolla.client.routing import LinkMeter
from corolla.worker.launcher import LocalSwarm, start_worker
from tests.bus_helpers import EchoServer, on_bus
from tests.conftest import worker_args
from tests.discovery_helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/ is a plain directory
from perf.relay import RelayThread  # noqa: E402

HIDDEN = 64  # the tiny llama's
MAX_AGE_S = 0.2
BLOCK_S = 0.5  # how long measuring a silent endpoint holds the meter: the ping's timeout
LANDS_S = 5.0  # a re-measurement on loopback takes milliseconds: this bounds a loaded machine's
DELAY_MS = 2.0  # one way through a relay: round trips of 4 ms, over session.PUSH_MIN_RTT_S


class Workers:
    """Tiny-llama workers on fixed loopback ports, so one can be restarted at its endpoint."""

    def __init__(self, folder: str, spans: list[str]):
        self.args = [[*a, "--port", str(free_port()), "--no-mdns"] for a in worker_args(folder, spans)]
        self.swarm = LocalSwarm(self.args)

    @property
    def endpoints(self) -> list[str]:
        return self.swarm.endpoints

    def restart(self, i: int) -> None:
        self.swarm.workers[i].stop()
        self.swarm.workers[i] = start_worker(*self.args[i])


@pytest.fixture(scope="module")
def workers(tiny_llama_folder):
    workers = Workers(tiny_llama_folder, ["0:2", "2:4"])
    with workers.swarm:
        yield workers


async def _until(predicate, timeout: float = LANDS_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "no new measurement landed"
        await asyncio.sleep(0.01)


def test_link_that_could_not_be_measured_is_tried_again_after_the_max_age():
    server = EchoServer()  # answers pings but not probes, like an old worker
    try:
        async def measure(pool):
            meter = LinkMeter(pool, max_age_s=MAX_AGE_S)
            assert await meter.get(server.endpoint) is None
            first = meter.measured_at[server.endpoint]
            assert await meter.get(server.endpoint) is None and meter.measured_at[server.endpoint] == first  # fresh
            await asyncio.sleep(MAX_AGE_S)
            assert await meter.get(server.endpoint) is None  # raw while it is tried again
            await _until(lambda: meter.measured_at[server.endpoint] > first)
        on_bus(measure)
    finally:
        server.close()


@pytest.mark.slow  # the workers' start
def test_stale_link_is_measured_again_in_the_background(workers):
    endpoint, silent = workers.endpoints[0], f"tcp://127.0.0.1:{free_port()}"

    async def measure(pool):
        meter = LinkMeter(pool, timeout=BLOCK_S, max_age_s=MAX_AGE_S)
        first = await meter.get(endpoint)
        await asyncio.sleep(MAX_AGE_S)
        blocker = asyncio.ensure_future(meter.get(silent))  # holds the meter, one link at a time, for BLOCK_S
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        stale = await meter.get(endpoint)
        waited = time.perf_counter() - started
        await asyncio.sleep(0.1)  # ample for a loopback measurement, were it not queued behind the silent one
        kept = meter.links[endpoint]
        assert await blocker is None
        await _until(lambda: meter.links[endpoint] is not first)
        return first, stale, kept, waited, meter.links[endpoint]

    first, stale, kept, waited, new = on_bus(measure)
    assert stale is first and kept is first and waited < BLOCK_S / 10  # the use went on with the old figure
    assert new.bandwidth > 100e6 and 0 < new.rtt_s < 0.1


@pytest.mark.slow  # the workers' start and a restart
def test_link_of_a_restarted_worker_is_measured_afresh(tiny_llama_folder, workers):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama_folder, initial_peers=workers.endpoints, routing="static", codec="auto", use_server_to_server=False)
    meter, tail = model.remote_layers.router.links, workers.endpoints[1]
    with model.remote_layers.inference_session(max_length=8) as session:
        session.step(torch.randn(1, 4, HIDDEN))
        before = meter.links[tail]
        workers.restart(1)
        restarted = time.monotonic()
        session.step(torch.randn(1, 1, HIDDEN))  # the tail lost the session: the step is replayed there
        assert session.recoveries == 1
    assert meter.links[tail] is not before and meter.measured_at[tail] > restarted


def _pushes_received(endpoint: str) -> int:
    return on_bus(lambda pool: pool.get(endpoint).request(InfoRequest(), 10.0)).extra["pushes_received"]


@pytest.mark.slow  # the workers' start
def test_static_chain_over_slow_links_pushes_once_round_trips_are_known(tiny_llama_folder, workers):
    from transformers import AutoModelForCausalLM

    ids, new = torch.tensor([[7, 8, 9, 10, 11]]), 8
    want = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval().generate(ids, max_new_tokens=new,
                                                                                    do_sample=False)
    relays = [RelayThread(("127.0.0.1", 0), ("127.0.0.1", int(e.rsplit(":", 1)[1])), delay_ms=DELAY_MS).start()
              for e in workers.endpoints]
    try:
        delayed = [f"tcp://127.0.0.1:{r.address[1]}" for r in relays]
        pushes = _pushes_received(workers.endpoints[1])
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=delayed,
                                                                routing="static", wire_dtype=None)
        assert torch.equal(model.generate(ids, max_new_tokens=new, do_sample=False), want)
        rtts = [model.remote_layers.router.round_trip(e) for e in delayed]
        pushed = _pushes_received(workers.endpoints[1]) - pushes
    finally:
        for relay in relays:
            relay.stop()
    assert all(rtt is not None and rtt >= 2 * DELAY_MS / 1000 for rtt in rtts), rtts
    assert pushed > 0  # the first step may relay while the pings are out; the later ones push
