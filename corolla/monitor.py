"""`corolla swarm`: a live table of the swarm, as a client would find it.

Per model: a coverage bar over its blocks (how many reachable workers hold
each block, '-' where none does), whether a full chain exists and what it
would cost per token, then one line per worker: its span, endpoint,
throughput, free KV cache (tokens), health (ping RTT, or unreachable) and
the LoRA adapters it serves.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from corolla.bus.client import BusLoop
from corolla.bus.errors import MissingBlocksError
from corolla.bus.security import Security
from corolla.client.routing import RttTracker, route
from corolla.discovery.entry import PeerEntry
from corolla.discovery.interfaces import order_endpoints
from corolla.discovery.observer import SwarmObserver
from corolla.discovery.view import SwarmView

MAX_BAR = 60
CLEAR = "\x1b[2J\x1b[H"


def bar_cells(num_blocks: int) -> list[tuple[int, int]]:
    """Block ranges drawn as one character each: one block per character up to MAX_BAR blocks."""
    width = min(num_blocks, MAX_BAR)
    return [(i * num_blocks // width, max((i + 1) * num_blocks // width, i * num_blocks // width + 1))
            for i in range(width)]


def coverage_bar(counts: list[int]) -> str:
    def glyph(n: int) -> str:
        return "-" if n == 0 else str(n) if n < 10 else "+"

    return "".join(glyph(min(counts[a:b])) for a, b in bar_cells(len(counts)))


def span_bar(peer: PeerEntry) -> str:
    return "".join("#" if peer.start < b and a < peer.end else "." for a, b in bar_cells(peer.num_blocks))


def render(view: SwarmView, rtt: RttTracker, model: str | None = None) -> str:
    """The table for what `view` and `rtt` know now."""
    peers = [p for p in view.peers() if model is None or p.model == model]
    if not peers:
        return "no workers found" + (f" serving {model}" if model else "")
    lines = []
    for name in sorted({p.model for p in peers}):
        mine = [p for p in peers if p.model == name]
        num_blocks = max(p.num_blocks for p in mine)
        reachable = [p for p in mine if p.endpoint not in rtt.unreachable]
        counts = [sum(p.serves(b) for p in reachable) for b in range(num_blocks)]
        try:
            hops, cost = route(reachable, 0, num_blocks,
                               lambda p, n: rtt.get(p.endpoint) + n / (p.throughput or float("inf")), name)
            chain = f"full chain: yes, {len(hops)} hop{'s' * (len(hops) != 1)}, ~{cost * 1000:.1f} ms per token"
        except MissingBlocksError as e:
            chain = "full chain: NO, missing blocks " + ", ".join(f"{a}:{b}" for a, b in e.missing)
        lines.append(f"{name}: {num_blocks} blocks, {len(mine)} worker{'s' * (len(mine) != 1)}; {chain}")
        lines.append(f"  {'coverage':<16}  [{coverage_bar(counts)}]")
        for p in mine:
            health = "unreachable" if p.endpoint in rtt.unreachable else f"ok {rtt.get(p.endpoint) * 1000:.1f} ms"
            throughput = f"{p.throughput:.0f} tok/s" if p.throughput else "? tok/s"
            adapters = f"  adapters {', '.join(p.adapters)}" if p.adapters else ""
            lines.append(f"  {p.peer_id:<16}  [{span_bar(p)}] {p.start:>3}:{p.end:<3} {p.endpoint:<28} "
                         f"{throughput:>12}  cache {p.cache_tokens_free:>7} free  {health}{adapters}")
    return "\n".join(lines)


def run_monitor(initial_peers: list[str], mdns: bool = True, interfaces: list[str] | None = None,
                model: str | None = None, once: bool = False, refresh: float = 3.0, wait: float = 3.0,
                out: TextIO = sys.stdout, swarm_key: str | None = None) -> None:
    bus = BusLoop.get()
    security = Security.from_file(swarm_key)

    async def start() -> tuple[SwarmView, SwarmObserver]:
        view = SwarmView(order_endpoints)
        observer = SwarmObserver(view, initial_peers, mdns=mdns, interfaces=interfaces, context=bus.context,
                                 security=security)
        await observer.start()
        if observer.browser is not None:  # mDNS answers come late on a loaded machine: listen all the time asked
            await asyncio.sleep(wait)
        else:
            await observer.settled(wait)
        return view, observer

    async def table(view: SwarmView, rtt: RttTracker) -> str:
        await asyncio.gather(*(rtt.ping(p.endpoint) for p in view.peers()))
        return render(view, rtt, model)

    view, observer = bus.run(start())
    rtt = RttTracker(observer.pool)
    try:
        while True:
            text = bus.run(table(view, rtt))
            if once:
                print(text, file=out, flush=True)
                return
            stamp = time.strftime("%H:%M:%S")
            print(f"{CLEAR if out.isatty() else ''}corolla swarm at {stamp} (every {refresh:g} s, Ctrl-C quits)\n"
                  f"{text}\n", file=out, flush=True)
            time.sleep(refresh)
    finally:
        bus.run(observer.stop())
