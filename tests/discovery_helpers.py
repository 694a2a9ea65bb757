"""Helpers of the discovery, gossip, routing and block-selection tests (fixtures live in each test file)."""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import torch

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.messages import InfoRequest, WorkerInfo
from corolla.discovery.entry import PeerEntry
from corolla.discovery.gossip import BusTransport, GossipNode

ROOT = Path(__file__).resolve().parents[1]
FAST_GOSSIP_S = 0.5
# Loopback workers of these tests: one torch thread, no mDNS in the root namespace, fast gossip.
WORKER_FLAGS = ["--threads", "1", "--no-mdns", "--gossip-interval", str(FAST_GOSSIP_S)]


def save_tiny_llama(path: Path, layers: int, hidden: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def entry(peer_id: str, start: int, end: int, num_blocks: int = 30, throughput: float = 100.0, model: str = "m",
          endpoint: str | None = None, **kw) -> PeerEntry:
    return PeerEntry(peer_id=peer_id, endpoints=(endpoint or f"tcp://{peer_id}.test:1",),
                     model=model, start=start, end=end, num_blocks=num_blocks, throughput=throughput, protocol=1, **kw)


def pull_table(endpoint: str, timeout: float = 2.0) -> list[PeerEntry]:
    """The live entries a client pulling gossip from `endpoint` once would see."""
    bus = BusLoop.get()

    async def pull() -> list[PeerEntry]:
        pool = ConnectionPool(bus.context)
        node = GossipNode(BusTransport(pool, timeout))
        try:
            await node.exchange(endpoint)
            return node.live()
        finally:
            await pool.close()

    return bus.run(pull())


def infos(endpoints: list[str], timeout: float = 5.0) -> list[WorkerInfo]:
    """Each worker's answer to InfoRequest now."""
    bus = BusLoop.get()

    async def ask() -> list[WorkerInfo]:
        pool = ConnectionPool(bus.context)
        try:
            return list(await asyncio.gather(*(pool.get(e).request(InfoRequest(), timeout) for e in endpoints)))
        finally:
            await pool.close()

    return bus.run(ask())


def spans(endpoints: list[str], timeout: float = 5.0) -> list[tuple[int, int]]:
    """What each worker serves now, by asking it."""
    return [(i.start, i.end) for i in infos(endpoints, timeout)]


def free_port() -> int:
    """A loopback port free right now (for a worker that others must know before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, poll: float = 0.1) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(poll)
    return None


def reference_tokens(folder: str, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by the whole model, locally, with transformers alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0].tolist()


# A client in its own process (and network namespace): find the swarm, generate greedily, print the tokens.
CLIENT_SCRIPT = """
import json, sys, torch
from corolla.client.model import AutoDistributedModelForCausalLM
folder, prompt, new_tokens, options = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
model = AutoDistributedModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
with torch.inference_mode():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
print(json.dumps(out[0].tolist()), flush=True)
"""


def client_command(folder: str, prompt_ids: list[int], new_tokens: int, **options) -> list[str]:
    return [sys.executable, "-c", CLIENT_SCRIPT, folder, json.dumps(prompt_ids), str(new_tokens), json.dumps(options)]


# Watches mDNS alone and prints what it finds and loses, one JSON line per event.
MDNS_WATCH_SCRIPT = """
import asyncio, json, time
from corolla.discovery.mdns import MdnsBrowser

def say(event, peer_id):
    print(json.dumps([event, peer_id, time.monotonic()]), flush=True)

async def main():
    browser = MdnsBrowser(["%s"], lambda e: say("found", e.peer_id), lambda p: say("lost", p))
    await browser.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def mdns_watch_command(address: str) -> list[str]:
    return [sys.executable, "-c", MDNS_WATCH_SCRIPT % address]
