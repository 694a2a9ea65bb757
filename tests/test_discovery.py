"""Discovery: interfaces, the swarm view, mDNS records, peers that do not gossip, `corolla swarm`, and whole
swarms finding themselves across network namespaces, over mDNS and (multicast blocked) over gossip."""
from __future__ import annotations

import asyncio
import io
import json
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.errors import ErrorCode
from corolla.bus.messages import InfoRequest, WorkerInfo
from corolla.bus.server import RequestError, Server
from corolla.client.routing import RttTracker
from corolla.discovery import interfaces as netif
from corolla.discovery.mdns import MDNS_TTL_S, SERVICE_TYPE, entry_from, properties
from corolla.discovery.observer import DIRECT, SwarmObserver
from corolla.discovery.view import SwarmView
from corolla.monitor import render, run_monitor
from corolla.worker.config import ConfigError, WorkerConfig
from corolla.worker.launcher import spawn_worker, stop_all

from tests.discovery_helpers import ROOT, client_command, entry, mdns_watch_command

sys.path.insert(0, str(ROOT))  # perf/ is a plain directory
from perf import netem  # noqa: E402

_ok, _reason = netem.netns_available()
needs_netns = pytest.mark.skipif(not _ok, reason=f"network namespaces unavailable: {_reason}")


# ---- interfaces and announced endpoints --------------------------------------------------------


def test_interfaces_and_announced_endpoints():
    assert netif.resolve(["127.0.0.1"]) == ["127.0.0.1"]
    assert netif.resolve(["lo"]) == ["127.0.0.1"]
    assert netif.resolve(None, bind_host="10.77.0.9") == ["10.77.0.9"]
    with pytest.raises(netif.InterfaceError, match="no IPv4 interface named 'nope9'"):
        netif.resolve(["nope9"])
    assert netif.announce_endpoints("tcp://0.0.0.0:5555", ["10.0.0.1", "10.0.1.1"]) == \
        ["tcp://10.0.0.1:5555", "tcp://10.0.1.1:5555"]
    assert netif.announce_endpoints("tcp://10.0.0.1:5555", ["10.0.0.1"]) == ["tcp://10.0.0.1:5555"]
    assert netif.announce_endpoints("tcp://0.0.0.0:5555", ["10.0.0.1"], public_host="203.0.113.7") == \
        ["tcp://203.0.113.7:5555"]
    assert not netif.announces_by_default("127.0.0.1") and netif.announces_by_default("0.0.0.0")
    assert netif.order_endpoints(("tcp://203.0.113.7:1", "tcp://127.0.0.1:2")) == \
        ("tcp://127.0.0.1:2", "tcp://203.0.113.7:1")  # an address on one of this host's networks first


def test_worker_discovery_settings_are_checked():
    ok = WorkerConfig.load(model="/m", initial_peers=["tcp://10.0.0.1:5"], gossip_interval=0.5, throughput=10)
    assert ok.initial_peers == ["tcp://10.0.0.1:5"] and ok.mdns
    for bad in (dict(gossip_interval=0), dict(rebalance_interval=-1), dict(initial_peers="tcp://x:1"),
                dict(throughput=-3), dict(interfaces=[1])):
        with pytest.raises(ConfigError):
            WorkerConfig.load(model="/m", **bad)


# ---- the view ------------------------------------------------------------------------------------


def test_view_merges_sources_by_version_and_tells_subscribers_of_real_changes():
    view = SwarmView()
    changes = []
    view.subscribe(lambda v: changes.append(v.generation))
    view.put("mdns", entry("a", 0, 10, version=1))
    view.replace("gossip", [entry("a", 0, 20, version=2, heartbeat=5), entry("b", 20, 30, model="other")])
    assert [(e.peer_id, e.span) for e in view.peers("m")] == [("a", (0, 20))]  # the newer version wins
    assert view.models() == {"m": 30, "other": 30}
    n = len(changes)
    view.replace("gossip", [entry("a", 0, 20, version=2, heartbeat=6), entry("b", 20, 30, model="other")])
    assert len(changes) == n, "a heartbeat alone is no news"
    view.drop("gossip", "a")
    assert view.get("a").span == (0, 10)  # mDNS still knows it
    view.put("mdns", entry("a", 0, 10, version=3, gone=True))
    assert view.get("a") is None and len(changes) == n + 2


def test_mdns_record_carries_the_entry():
    from zeroconf.asyncio import AsyncServiceInfo

    e = entry("0123456789abcdef", 5, 17, throughput=321.5, version=4, dtype="bfloat16")
    info = AsyncServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", addresses=[socket.inet_aton("10.77.0.2")], port=4000,
                            properties=properties(e, "tcp://10.77.0.2:4000"))
    back = entry_from(info, now=1.0)
    assert (back.peer_id, back.endpoints, back.span, back.num_blocks, back.throughput, back.version, back.dtype) == \
        (e.peer_id, ("tcp://10.77.0.2:4000",), (5, 17), 30, 321.5, 4, "bfloat16")


# ---- peers that do not gossip, and `corolla swarm` ------------------------------------------------


def test_an_initial_peer_that_does_not_gossip_still_counts():
    """A worker of an older build answers InfoRequest but not gossip: the client uses what it says it serves."""
    bus = BusLoop.get()
    info = WorkerInfo(peer_id="old", model="m", start=0, end=30, num_blocks=30, dtype="float32", version=1,
                      cache_tokens_free=1, cache_tokens_total=1, throughput=50.0)

    async def old_worker(envelope):
        if isinstance(envelope.message, InfoRequest):
            return info
        raise RequestError(ErrorCode.UNKNOWN_KIND, "no gossip here")

    async def scenario():
        server = Server(old_worker, context=bus.context)
        serving = asyncio.ensure_future(server.serve())
        view = SwarmView()
        observer = SwarmObserver(view, [server.endpoint], mdns=False, interval=0.2, context=bus.context)
        await observer.start()
        await observer.settled(5.0)
        await observer.stop()
        serving.cancel()
        server.close()
        return view

    view = bus.run(scenario())
    (peer,) = view.peers("m")
    assert (peer.peer_id, peer.endpoint, peer.span, peer.throughput) == ("old", peer.endpoint, (0, 30), 50.0)
    assert view._sources[DIRECT]


def test_swarm_table_shows_coverage_chain_and_health():
    view = SwarmView()
    for e in (entry("aaaa", 0, 10, num_blocks=30, endpoint="tcp://10.0.0.1:1"),
              entry("bbbb", 0, 10, num_blocks=30, endpoint="tcp://10.0.0.2:1"),
              entry("cccc", 20, 30, num_blocks=30, endpoint="tcp://10.0.0.3:1", throughput=0, cache_tokens_free=512,
                    adapters=("pirate", "ninja"))):
        view.put("test", e)
    rtt = RttTracker(ConnectionPool(BusLoop.get().context))
    rtt.rtt.update({"tcp://10.0.0.1:1": 0.002, "tcp://10.0.0.3:1": 0.004})
    rtt.unreachable.add("tcp://10.0.0.2:1")
    table = render(view, rtt)
    assert "m: 30 blocks, 3 workers; full chain: NO, missing blocks 10:20" in table
    assert "[1111111111----------1111111111]" in table  # the unreachable replica does not count
    assert "aaaa              [##########....................]   0:10  tcp://10.0.0.1:1" in table
    assert "ok 2.0 ms" in table and "unreachable" in table and "? tok/s" in table
    assert "cache     512 free  ok 4.0 ms  adapters pirate, ninja" in table
    view.put("test", entry("dddd", 5, 25, num_blocks=30, endpoint="tcp://10.0.0.4:1"))
    rtt.rtt["tcp://10.0.0.4:1"] = 0.001
    assert "full chain: yes, 3 hops" in render(view, rtt)


def test_swarm_command_with_nobody_to_ask():
    out = io.StringIO()
    run_monitor([], mdns=False, once=True, wait=0.1, out=out)
    assert out.getvalue().strip() == "no workers found"


# ---- whole swarms across network namespaces ------------------------------------------------------


def _worker(topo, host: str, folder: str, *args: str):
    return spawn_worker("--model", folder, "--host", "0.0.0.0", "--threads", "1", "--gossip-interval", "0.5", *args,
                        prefix=topo.command(host, []))


def _prompt(tokenizer) -> list[int]:
    return tokenizer("The three primary colors are", return_tensors="pt").input_ids[0].tolist()


def _expected(local, prompt: list[int], new: int) -> list[int]:
    import torch
    with torch.inference_mode():
        return local.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0].tolist()


class MdnsWatch:
    """The events of an mDNS watcher process, read by a thread (select() cannot see lines already buffered)."""

    def __init__(self, proc: subprocess.Popen):
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.events.put(json.loads(line))

    def wait(self, event: str, peer_id: str, timeout: float) -> float | None:
        """The watcher's monotonic time of `event` for `peer_id`, or None if it does not come in `timeout` s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev, pid, at = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if (ev, pid) == (event, peer_id):
                return at
        return None


def _peer_id(worker) -> str:
    ready = next(line for line in worker.output if "corolla worker ready" in line)
    return ready.rsplit("peer ", 1)[1].strip(" )\n")


NEW_TOKENS = 8


@pytest.mark.slow
@pytest.mark.netns
@needs_netns
def test_mdns_finds_the_swarm_with_no_configuration(smollm_folder, smollm_local, smollm_tokenizer):
    """Workers in two namespaces, a client in a third: nobody is told anything, mDNS finds everyone, the text is
    the local model's. A worker that leaves vanishes at once, one that dies within the record TTL."""
    prompt = _prompt(smollm_tokenizer)
    with netem.Topology(["w1", "w2", "client"], profile="lan-1g") as topo:
        watch = MdnsWatch(topo.popen("client", mdns_watch_command(topo.addr("client")), stdout=subprocess.PIPE,
                                     text=True))
        workers = [_worker(topo, "w1", smollm_folder, "--blocks", "0:15"),
                   _worker(topo, "w2", smollm_folder, "--blocks", "15:30")]
        try:
            for w in workers:
                w.wait_ready()
            out = topo.run("client", client_command(smollm_folder, prompt, NEW_TOKENS), timeout=120)
            assert json.loads(out.stdout.strip().splitlines()[-1]) == _expected(smollm_local, prompt, NEW_TOKENS)

            table = topo.run("client", [sys.executable, "-m", "corolla", "swarm", "--once", "--wait", "3"]).stdout
            assert "full chain: yes" in table, table
            for host in ("w1", "w2"):
                assert f"tcp://{topo.addr(host)}:" in table, table  # a concrete address per interface, never 0.0.0.0

            ids = [_peer_id(w) for w in workers]
            assert watch.wait("found", ids[1], 10) is not None
            killed = time.monotonic()
            workers[1].process.kill()  # dies without a word
            lost = watch.wait("lost", ids[1], MDNS_TTL_S + 5)
            assert lost is not None and lost - killed <= MDNS_TTL_S + 2, "a dead worker lapses with its records"
            left = time.monotonic()
            workers[0].process.terminate()  # leaves: unregisters
            gone = watch.wait("lost", ids[0], 5)
            assert gone is not None and gone - left < 2, "a worker that leaves says goodbye"
        finally:
            stop_all(workers)


def _block_multicast(topo) -> None:
    """Stop the bridge flooding multicast to any port: mDNS cannot cross, unicast TCP still does."""
    bridge = f"{netem.PREFIX}{topo.run_id}-br"
    for i in range(len(topo.hosts)):
        subprocess.run(["ip", "netns", "exec", bridge, "bridge", "link", "set", "dev", f"p{i}", "mcast_flood", "off"],
                       check=True)


@pytest.mark.slow
@pytest.mark.netns
@needs_netns
def test_gossip_finds_the_swarm_when_multicast_is_blocked(smollm_folder, smollm_local, smollm_tokenizer):
    """The same swarm with multicast blocked on the switch: mDNS finds nobody, but each worker and the client
    know one live peer, and gossip does the rest."""
    prompt = _prompt(smollm_tokenizer)
    with netem.Topology(["w1", "w2", "client"], profile="lan-1g") as topo:
        _block_multicast(topo)
        first = _worker(topo, "w1", smollm_folder, "--blocks", "0:15")
        workers = [first]
        try:
            first.wait_ready()
            seed = f"tcp://{topo.addr('w1')}:{first.endpoint.rsplit(':', 1)[1]}"
            workers.append(_worker(topo, "w2", smollm_folder, "--blocks", "15:30", "--initial-peers", seed).wait_ready())
            second = f"tcp://{topo.addr('w2')}:{workers[1].endpoint.rsplit(':', 1)[1]}"

            mdns_only = topo.run("client", [sys.executable, "-m", "corolla", "swarm", "--once", "--wait", "3"]).stdout
            assert mdns_only.strip() == "no workers found", "multicast is really blocked"
            out = topo.run("client", client_command(smollm_folder, prompt, NEW_TOKENS, initial_peers=[second]),
                           timeout=120)
            assert json.loads(out.stdout.strip().splitlines()[-1]) == _expected(smollm_local, prompt, NEW_TOKENS)
            assert sorted(topo_pull(topo, second)) == sorted([seed, second]), "the workers met by gossip"
        finally:
            stop_all(workers)


def topo_pull(topo, endpoint: str) -> list[str]:
    """Endpoints of the gossip table as the client's namespace pulls it from `endpoint`."""
    script = ("import sys; from tests.discovery_helpers import pull_table\n"
              "print('\\n'.join(e.endpoint for e in pull_table(sys.argv[1])))")
    return topo.run("client", [sys.executable, "-c", script, endpoint], cwd=str(ROOT)).stdout.split()
