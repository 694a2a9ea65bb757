"""A private swarm (CurveZMQ with a shared swarm key): keyed peers work, strangers are refused."""
from __future__ import annotations

import asyncio

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.bus.client import BusLoop, Connection, ConnectionPool
from corolla.bus.errors import ErrorCode, RemoteError
from corolla.bus.messages import InfoRequest
from corolla.bus.security import Security, generate_secret
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "swarm.key"
    path.write_text(generate_secret())
    return str(path)


def _ask(endpoint, security, timeout=2.0):
    bus = BusLoop.get()

    async def go():
        pool = ConnectionPool(bus.context, security)
        try:
            return await pool.get(endpoint).request(InfoRequest(), timeout)
        finally:
            await pool.close()

    return bus.run(go())


def test_keyed_peers_work_and_strangers_are_refused(tiny_llama_folder, key):
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    want = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).generate(ids, max_new_tokens=8, do_sample=False)
    args = worker_args(tiny_llama_folder, ["0:2", "2:4"], "--swarm-key", key, "--no-mdns")
    with LocalSwarm(args) as swarm:
        keyed = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=swarm.endpoints,
                                                                swarm_key=key, routing="static", wire_dtype=None)
        assert torch.equal(keyed.generate(ids, max_new_tokens=8, do_sample=False), want)
        for stranger in (Security.public(), Security.from_secret("a guess")):
            with pytest.raises(RemoteError) as e:
                _ask(swarm.endpoints[0], stranger)
            assert e.value.code in (ErrorCode.TIMEOUT, ErrorCode.UNREACHABLE)  # refused: nothing is answered
        assert _ask(swarm.endpoints[0], Security.from_file(key)).start == 0

    # an unkeyed worker cannot serve a keyed client: the client refuses to talk in the clear
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:4"], "--no-mdns")) as open_swarm:
        with pytest.raises(RemoteError):
            _ask(open_swarm.endpoints[0], Security.from_file(key))
        assert isinstance(_ask(open_swarm.endpoints[0], Security.public()).start, int)


def test_worker_without_the_key_cannot_join_by_gossip(tiny_llama_folder, key):
    """A keyed worker's gossip never admits an unkeyed worker that names it as its initial peer."""
    from corolla.bus.messages import GossipDigest
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2"], "--swarm-key", key, "--no-mdns")) as swarm:
        bus = BusLoop.get()

        async def gossip():
            pool = ConnectionPool(bus.context, Security.public())
            try:
                return await pool.get(swarm.endpoints[0]).request(GossipDigest(None), 2.0)
            finally:
                await pool.close()

        with pytest.raises(RemoteError):
            bus.run(gossip())
        assert isinstance(_ask(swarm.endpoints[0], Security.from_file(key)).start, int)


def test_requests_without_the_key_end_at_their_timeout(tiny_llama_folder, key):
    """A client without the swarm key, its handshake refused, has no pipe to the worker for spells (ZeroMQ keeps
    trying again), so a send cannot leave then: every request still ends by its timeout, never hangs."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2"], "--swarm-key", key, "--no-mdns")) as swarm:
        bus = BusLoop.get()

        async def go() -> list[str]:
            conn = Connection(swarm.endpoints[0], bus.context)
            outcomes = []
            try:
                for _ in range(20):
                    try:
                        await conn.request(InfoRequest(), timeout=0.2)
                        outcomes.append("answered")
                    except RemoteError as e:
                        outcomes.append(str(e.code))
                    await asyncio.sleep(0.05)
                return outcomes
            finally:
                await conn.close()

        outcomes = bus.run(go(), timeout=30)
        assert set(outcomes) <= {str(ErrorCode.TIMEOUT), str(ErrorCode.UNREACHABLE)}, outcomes
