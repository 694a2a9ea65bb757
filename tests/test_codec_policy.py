"""Codec "auto": the policy's choice from measurements, the probe that measures a link over real sockets, and
sessions that choose per link (raw on loopback with tokens identical to local, int8 for big payloads on 100 Mbit/s)."""
from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.bus import wire
from corolla.bus.messages import Probe
from corolla.client.config import ClientConfig
from corolla.client.routing import LinkMeter
from corolla.compression import encode, policy
from corolla.worker.launcher import LocalSwarm, spawn_worker
from tests.bus_helpers import EchoServer, on_bus
from tests.conftest import worker_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # perf/ is a plain directory, not part of the corolla package

from perf import netem  # noqa: E402

_ok, _reason = netem.netns_available()
needs_netns = pytest.mark.skipif(not _ok, reason=f"network namespaces unavailable: {_reason}")

HIDDEN = 576  # SmolLM2-135M
FP16 = 2
MBIT = 1e6 / 8  # bytes/s


# ---- the policy, from given measurements --------------------------------------------------------


@pytest.mark.parametrize("bandwidth,numel,want", [
    (None, 16 * 128 * HIDDEN, "raw"),  # not measured: as without a policy
    (100 * MBIT, HIDDEN, "raw"),  # a decode step is tiny on any link
    (1 * MBIT, HIDDEN, "raw"),
    (100 * MBIT, 128 * HIDDEN, "raw"),  # a 128-token prompt saves 6 ms at 100 Mbit/s: not worth the drift
    (100 * MBIT, 4 * 128 * HIDDEN, "int8"),  # a micro-batch of 512 tokens saves 23 ms
    (1000 * MBIT, 4 * 128 * HIDDEN, "raw"),  # ... 2 ms on a gigabit LAN
    (10 * MBIT, 128 * HIDDEN, "int8"),
    (2.5e9, 64 * 128 * HIDDEN, "raw"),  # loopback: encoding would cost more than the bytes it saves
    (math.inf, 64 * 128 * HIDDEN, "raw"),
])
def test_policy_choice(bandwidth, numel, want):
    assert policy.choose(bandwidth, numel, FP16) == want


def test_policy_counts_the_bytes_the_codecs_send():
    x = torch.randn(3, 7, HIDDEN)
    for codec in ("raw", "int8"):
        _, frame = encode(x, codec, torch.float16)
        assert memoryview(frame).nbytes == policy.wire_bytes(codec, x.numel(), FP16)


def test_fp32_on_the_wire_tips_to_int8_sooner():
    numel = 128 * HIDDEN
    assert policy.choose(100 * MBIT, numel, FP16) == "raw"
    assert policy.choose(100 * MBIT, numel, 4) == "int8"


# ---- the probe over real sockets -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_worker(tiny_llama_folder):
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:4"])) as swarm:
        yield swarm.endpoints[0]


@pytest.mark.slow  # the worker's start
def test_worker_echoes_probe(tiny_worker):
    data = torch.randint(0, 256, (100_000,), dtype=torch.uint8)
    reply = on_bus(lambda pool: pool.get(tiny_worker).request(Probe(data), 10.0))
    assert torch.equal(reply.data, data)


@pytest.mark.slow
def test_loopback_link_is_measured_fast_and_stays_raw(tiny_worker):
    async def measure(pool):
        meter = LinkMeter(pool)
        link = await meter.get(tiny_worker)
        big = torch.zeros(16, 128, HIDDEN)
        return link, await meter.codec(ClientConfig(), big, tiny_worker), meter.links

    link, codec, links = on_bus(measure)
    assert 0 < link.rtt_s < 0.1
    assert link.bandwidth > 100e6  # loopback: hundreds of MB/s even on a busy 2-core box
    assert codec == wire.Codec("raw", torch.float16)
    assert links == {tiny_worker: link}  # measured once, then cached


def test_link_that_cannot_be_probed_goes_raw():
    server = EchoServer()  # answers ping and forward only, like a worker without probes
    try:
        async def measure(pool):
            meter = LinkMeter(pool)
            return await meter.get(server.endpoint), await meter.codec(ClientConfig(), torch.zeros(64, 128, HIDDEN),
                                                                     server.endpoint)
        link, codec = on_bus(measure)
    finally:
        server.close()
    assert link is None and codec == wire.Codec("raw", torch.float16)


@pytest.mark.parametrize("name", ["raw", "lz4", "int8"])
def test_explicit_codecs_are_kept_without_measuring(name):
    config = ClientConfig(codec=name)

    async def ask(pool):
        meter = LinkMeter(pool)
        return await meter.codec(config, torch.zeros(16, 128, HIDDEN), "tcp://127.0.0.1:1"), meter.links

    codec, links = on_bus(ask)
    assert codec == config.activation_codec == wire.Codec(name, torch.float16)
    assert links == {}


# ---- sessions -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("push", [False, True], ids=["relayed", "pushed"])
def test_auto_on_loopback_picks_raw_and_matches_local(smollm_folder, smollm_swarm, smollm_local, smollm_tokenizer,
                                                      push):
    ids = smollm_tokenizer("A cat sat on the mat. Then the cat", return_tensors="pt").input_ids
    model = AutoDistributedModelForCausalLM.from_pretrained(smollm_folder, initial_peers=smollm_swarm.endpoints,
                                                            routing="static", codec="auto", use_server_to_server=push)
    got = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, smollm_local.generate(ids, max_new_tokens=16, do_sample=False))
    links = model.remote_layers.router.links.links
    assert set(links) == set(smollm_swarm.endpoints)
    prompt = torch.zeros(1, ids.shape[1], HIDDEN)
    for endpoint, link in links.items():
        assert link.bandwidth > 100e6
        assert policy.choose(link.bandwidth, prompt.numel(), FP16) == "raw"


MEASURE_IN_CLIENT = textwrap.dedent("""
    import json, sys, torch
    from corolla.bus.client import BusLoop, ConnectionPool
    from corolla.client.config import ClientConfig
    from corolla.client.routing import LinkMeter
    endpoint = sys.argv[1]
    bus = BusLoop.get()
    async def measure():
        meter = LinkMeter(ConnectionPool(bus.context))
        link = await meter.get(endpoint)
        forward = await meter.codec(ClientConfig(codec="auto"), torch.zeros(4, 128, 576), endpoint)  # a 512-token micro-batch
        step = await meter.codec(ClientConfig(codec="auto"), torch.zeros(1, 1, 576), endpoint)
        return {"rtt_s": link.rtt_s, "bandwidth": link.bandwidth, "forward": forward.name, "step": step.name}
    print(json.dumps(bus.run(measure(), timeout=60)))
""")


@pytest.mark.slow
@pytest.mark.netns
@needs_netns
def test_lan_100m_link_is_measured_and_big_payloads_go_int8(tiny_llama_folder):
    with netem.Topology(["w1", "client"], profile="lan-100m") as topo:
        worker = spawn_worker("--model", tiny_llama_folder, "--blocks", "0:4", "--host", topo.addr("w1"),
                              "--port", "31400", "--no-mdns", "--threads", "1",
                              prefix=["ip", "netns", "exec", topo.netns("w1")])
        try:
            worker.wait_ready(120)
            res = topo.run("client", [sys.executable, "-c", MEASURE_IN_CLIENT, worker.endpoint], timeout=120)
        finally:
            worker.stop()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert 60 <= out["bandwidth"] / MBIT <= 130, out
    assert out["rtt_s"] < 0.005, out
    assert (out["forward"], out["step"]) == ("int8", "raw"), out
