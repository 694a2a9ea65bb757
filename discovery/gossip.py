"""Gossip: every worker keeps a table of the swarm and reconciles it with a few random peers each round.

One exchange is push-pull anti-entropy in three messages:

1. A sends a `GossipDigest`: (key, version, heartbeat, age) per peer it knows.
2. B adopts every newer heartbeat the digest carries and answers `GossipEntries`:
   full entries A lacks or holds at an older version, B's newer heartbeats
   ("beats") of entries A holds, and the keys whose full entries B wants.
3. A merges the answer and pushes the wanted entries (`GossipEntries`, acked).

A peer's owner alone bumps its version (metadata changed) and its heartbeat
(once per round). Heartbeats travel with their *age* (ms since the owner
emitted them, accumulated hop by hop), so every process knows how old its
freshest news of a peer is without synchronised clocks. An entry whose age
passes the TTL is dropped everywhere at about the same time, and is never
adopted again (that is what keeps dead peers from being resurrected by a peer
that still remembers them). The TTL is three gossip intervals, stretched in
large swarms to the rounds a heartbeat needs to reach everyone (about
log_{2f+1} N for fanout f) plus two, so distance is never mistaken for death.
A departing worker bumps its version once more with `gone` set, a tombstone,
and pushes it to a few peers; it then spreads like any newer version.

The table keeps heartbeats in numpy arrays sorted by a 64-bit key per peer,
so a digest of 10,000 peers compares in microseconds (perf/sim_gossip.py runs
this very code with 10,000 peers in one process). The node only needs a
`Transport` (request a message, get the reply): the bus in workers and
clients, memory in the simulator.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import torch

from corolla.bus.client import ConnectionPool
from corolla.bus.errors import ErrorCode
from corolla.bus.messages import Ack, GossipDigest, GossipEntries
from corolla.bus.server import RequestError
from corolla.discovery.entry import MAX_COUNTER, EntryError, PeerEntry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_FANOUT = 3  # peers a worker exchanges with per round
OBSERVER_FANOUT = 1  # peers a client pulls from per round
MISSED_HEARTBEATS = 3  # a silent peer expires after this many rounds (more in large swarms, see ttl)
DISSEMINATION_MARGIN_ROUNDS = 2
GOODBYE_FANOUT = 2 * DEFAULT_FANOUT
INTERVAL_JITTER = 0.1  # rounds start every interval x U(0.9, 1.1), so peers never fall into lockstep
MAX_ENTRIES_PER_MESSAGE = 2000  # ~400 kB of full entries: well under the bus's 1 MiB header limit
MAX_DIGEST_RECORDS = 40_000  # 800 kB; beyond it a digest is a random sample and anti-entropy still converges

DIGEST_RECORD = np.dtype([("key", "<u8"), ("ver", "<u4"), ("hb", "<u4"), ("age", "<u4")])
KEY = np.dtype("<u8")


def peer_key(peer_id: str) -> int:
    """The 64-bit key a peer id travels as in digests (collisions: ~1 in 10^11 for 10,000 peers)."""
    return int.from_bytes(hashlib.blake2b(peer_id.encode(), digest_size=8).digest(), "little")


class Transport(Protocol):
    """How a node reaches another: send a message to an endpoint, get the reply (or an exception)."""

    async def request(self, endpoint: str, msg: Any) -> Any: ...

    def forget(self, endpoint: str) -> None:
        """The peer at `endpoint` left the table: release whatever reaches it."""


class BusTransport:
    """Gossip over the bus: DEALER connections of a pool of its own, so gossip never queues behind activations."""

    def __init__(self, pool: ConnectionPool, timeout: float):
        self.pool = pool
        self.timeout = timeout

    async def request(self, endpoint: str, msg: Any) -> Any:
        return await self.pool.get(endpoint).request(msg, self.timeout)

    def forget(self, endpoint: str) -> None:
        asyncio.ensure_future(self.pool.drop(endpoint))


class PeerTable:
    """Entries, with versions and heartbeats in parallel numpy arrays sorted by key.

    `entries[i]` holds the metadata at version `ver[i]`; `hb[i]` and `heard[i]`
    (local time the heartbeat was current) are authoritative for the heartbeat.
    """

    def __init__(self):
        self.keys = np.empty(0, KEY)
        self.ver = np.empty(0, np.uint32)
        self.hb = np.empty(0, np.uint32)
        self.heard = np.empty(0, np.float64)
        self.gone = np.empty(0, bool)
        self.entries = np.empty(0, object)

    def __len__(self) -> int:
        return len(self.keys)

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its index here (clipped) and whether it is here at all."""
        if len(keys) == len(self.keys) and np.array_equal(keys, self.keys):  # the usual case once converged
            return np.arange(len(keys)), np.ones(len(keys), bool)
        if not len(self.keys):
            return np.zeros(len(keys), np.intp), np.zeros(len(keys), bool)
        idx = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return idx, self.keys[idx] == keys

    def index(self, key: int) -> int | None:
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        return i if i < len(self.keys) and self.keys[i] == key else None

    def ages_ms(self, idx: np.ndarray | slice, now: float) -> np.ndarray:
        return np.clip((now - self.heard[idx]) * 1000, 0, MAX_COUNTER).astype(np.uint32)

    def records(self, idx: np.ndarray | slice, now: float) -> np.ndarray:
        keys = self.keys[idx]
        out = np.empty(len(keys), DIGEST_RECORD)
        out["key"], out["ver"], out["hb"], out["age"] = keys, self.ver[idx], self.hb[idx], self.ages_ms(idx, now)
        return out

    def wire(self, i: int, now: float) -> dict:
        return self.entries[i].to_wire(age_ms=(now - self.heard[i]) * 1000, heartbeat=int(self.hb[i]))

    def export(self, i: int) -> PeerEntry:
        return self.entries[i].replace(heartbeat=int(self.hb[i]), heard_at=float(self.heard[i]))

    def upsert(self, items: dict[int, PeerEntry]) -> None:
        """Insert or overwrite entries (their version, heartbeat and heard_at included)."""
        keys = np.fromiter(items, KEY, len(items))
        values = list(items.values())
        idx, found = self.locate(keys)
        for i, entry in zip(idx[found], (v for v, f in zip(values, found) if f)):
            self.assign(i, entry)
        if not found.all():
            new = [v for v, f in zip(values, found) if not f]
            order = np.argsort(np.concatenate([self.keys, keys[~found]]), kind="stable")
            self.keys = np.concatenate([self.keys, keys[~found]])[order]
            self.ver = np.concatenate([self.ver, _column(new, "version", np.uint32)])[order]
            self.hb = np.concatenate([self.hb, _column(new, "heartbeat", np.uint32)])[order]
            self.heard = np.concatenate([self.heard, _column(new, "heard_at", np.float64)])[order]
            self.gone = np.concatenate([self.gone, _column(new, "gone", bool)])[order]
            added = np.empty(len(new), object)
            added[:] = new
            self.entries = np.concatenate([self.entries, added])[order]

    def assign(self, i: int, entry: PeerEntry) -> None:
        """Overwrite slot `i` (same key) with `entry`, its version, heartbeat and heard_at included."""
        self.entries[i] = entry
        self.ver[i], self.hb[i], self.heard[i], self.gone[i] = entry.version, entry.heartbeat, entry.heard_at, entry.gone

    def remove(self, mask: np.ndarray) -> None:
        keep = ~mask
        for name in ("keys", "ver", "hb", "heard", "gone", "entries"):
            setattr(self, name, getattr(self, name)[keep])


class GossipNode:
    """A worker's (member) or client's (observer) part of the gossip.

    A member holds its own entry (`me`), beats it every round and answers
    digests; an observer only pulls, with a smaller fanout, to keep a client's
    view fresh. `listener(entries)` gets the live entries after each round and
    after every merge that changed membership or versions.
    """

    def __init__(self, transport: Transport, me: PeerEntry | None = None, seeds: Iterable[str] = (),
                 interval: float = DEFAULT_INTERVAL_S, fanout: int | None = None, ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 listener: Callable[[list[PeerEntry]], None] | None = None,
                 pick_endpoint: Callable[[tuple[str, ...]], str] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None):
        self.transport = transport
        self.interval = interval
        self._fanout = fanout
        self._ttl = ttl
        self.clock = clock
        self.rng = rng or random.Random()
        self.listener = listener
        self.pick_endpoint = pick_endpoint or (lambda endpoints: endpoints[0])
        self.on_error = on_error
        self.table = PeerTable()
        self.me_key: int | None = None
        self.seeds: list[str] = []
        # seeds not reached yet, or whose peer expired: asked every round until they answer
        self.pending_seeds: set[str] = set()
        self.rounds = 0
        self.first_round = asyncio.Event()
        self._dirty = False
        self._task: asyncio.Task | None = None
        self._rounds: set[asyncio.Task] = set()
        self.add_seeds(seeds)
        if me is not None:
            self.become(me)

    # ---- membership -----------------------------------------------------------------------

    @property
    def member(self) -> bool:
        return self.me_key is not None

    @property
    def fanout(self) -> int:
        return self._fanout or (DEFAULT_FANOUT if self.member else OBSERVER_FANOUT)

    @property
    def ttl(self) -> float:
        """Seconds without a fresher heartbeat after which an entry is dropped."""
        if self._ttl is not None:
            return self._ttl
        n = max(len(self.table), 2)
        dissemination = math.ceil(math.log(n) / math.log(2 * DEFAULT_FANOUT + 1)) + DISSEMINATION_MARGIN_ROUNDS
        return self.interval * max(MISSED_HEARTBEATS, dissemination)

    def become(self, me: PeerEntry) -> None:
        """Turn this node into a member gossiping `me` (an observer that found its blocks becomes one)."""
        self.me_key = peer_key(me.peer_id)
        self.table.upsert({self.me_key: me.replace(heard_at=self.clock())})
        self._dirty = True

    @property
    def me(self) -> PeerEntry | None:
        i = self._my_index()
        return None if i is None else self.table.export(i)

    def add_seeds(self, endpoints: Iterable[str]) -> None:
        for endpoint in endpoints:
            if endpoint not in self.seeds:
                self.seeds.append(endpoint)
                self.pending_seeds.add(endpoint)

    def update_self(self, **changes: Any) -> None:
        """Change this member's metadata; peers learn the new version in the next exchanges."""
        i = self._my_index()
        old = self.table.entries[i]
        new = old.replace(**changes)
        if new != old:
            self.table.assign(i, new.replace(version=old.version + 1, heartbeat=int(self.table.hb[i]),
                                           heard_at=self.clock()))
            self._dirty = True

    def _my_index(self) -> int | None:
        return None if self.me_key is None else self.table.index(self.me_key)

    # ---- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        """A round every interval, start to start: a round waiting on a dead peer never delays the next one."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval * self.rng.uniform(1 - INTERVAL_JITTER, 1 + INTERVAL_JITTER)
            round_ = asyncio.ensure_future(self.gossip_round())
            self._rounds.add(round_)
            round_.add_done_callback(self._round_done)
            await asyncio.sleep(max(0.0, due - loop.time()))

    def _round_done(self, task: asyncio.Task) -> None:
        self._rounds.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gossip round failed", exc_info=task.exception())

    async def stop(self) -> None:
        """Stop gossiping (rounds under way included); the table stays as it is."""
        tasks = [t for t in (self._task, *self._rounds) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def leave(self) -> None:
        """Say goodbye: a tombstone pushed straight to a few peers, from where it spreads."""
        await self.stop()
        if not self.member:
            return
        targets = self._targets(GOODBYE_FANOUT, with_seeds=False)
        self.update_self(gone=True)
        i = self._my_index()
        self.table.hb[i] += 1
        goodbye = GossipEntries(entries=[self.table.wire(i, self.clock())])
        results = await asyncio.gather(*(self.transport.request(t, goodbye) for t in targets), return_exceptions=True)
        log.info("said goodbye to %d of %d peers", sum(not isinstance(r, Exception) for r in results), len(targets))

    async def gossip_round(self) -> None:
        now = self.clock()
        i = self._my_index()
        if i is not None:
            self.table.hb[i] += 1
            self.table.heard[i] = now
        self.expire(now)
        targets = self._targets(self.fanout, with_seeds=True)
        await asyncio.gather(*(self.exchange(t) for t in targets))
        self.rounds += 1
        self.first_round.set()
        self._notify(force=True)

    def _targets(self, fanout: int, with_seeds: bool) -> list[str]:
        candidates = np.flatnonzero(~self.table.gone & (self.table.keys != np.uint64(self.me_key or 0)))
        chosen = self.rng.sample(range(len(candidates)), min(fanout, len(candidates)))
        targets = [self.pick_endpoint(self.table.entries[candidates[c]].endpoints) for c in chosen]
        if with_seeds:
            targets += self.seeds if not len(candidates) else sorted(self.pending_seeds)
        return list(dict.fromkeys(targets))

    def expire(self, now: float) -> None:
        stale = (now - self.table.heard) > self.ttl
        i = self._my_index()
        if i is not None:
            stale[i] = False
        if not stale.any():
            return
        for entry in self.table.entries[stale]:
            if not entry.gone:
                log.info("peer %s (%s) expired: silent for over %.1f s", entry.peer_id, entry.endpoint, self.ttl)
            for endpoint in entry.endpoints:
                self.transport.forget(endpoint)
                if endpoint in self.seeds:  # asked every round again: it may come back, and no peer may know it
                    self.pending_seeds.add(endpoint)
        self.table.remove(stale)
        self._dirty = True

    # ---- one exchange, requester side ------------------------------------------------------

    async def exchange(self, endpoint: str) -> bool:
        """Push-pull with the peer at `endpoint`; False if it did not answer."""
        try:
            reply = await self.transport.request(endpoint, GossipDigest(_pack(self._digest(self.clock()))))
            self.pending_seeds.discard(endpoint)
            self.merge(reply.entries, reply.beats)
            want = _keys(reply.want)
            if len(want):
                push = self._wire_for(want)
                if push:
                    await self.transport.request(endpoint, GossipEntries(entries=push))
            return True
        except Exception as e:  # an unreachable or confused peer costs one exchange, never the round
            log.debug("gossip with %s failed: %s", endpoint, e)
            if self.on_error is not None:
                self.on_error(endpoint, e)
            return False

    def _digest(self, now: float) -> np.ndarray:
        n = len(self.table)
        if n <= MAX_DIGEST_RECORDS:
            return self.table.records(slice(None), now)
        return self.table.records(np.sort(self.rng.sample(range(n), MAX_DIGEST_RECORDS)), now)

    def _wire_for(self, keys: np.ndarray) -> list[dict]:
        idx, found = self.table.locate(keys)
        now = self.clock()
        return [self.table.wire(i, now) for i in idx[found][:MAX_ENTRIES_PER_MESSAGE]]

    # ---- one exchange, responder side ------------------------------------------------------

    async def handle(self, msg: GossipDigest | GossipEntries) -> GossipEntries | Ack:
        """Serve a peer's digest or push (WorkerService.add_handler takes this)."""
        if isinstance(msg, GossipDigest):
            return self.answer(msg.digest)
        self.merge(msg.entries, msg.beats)
        return Ack()

    def answer(self, raw: torch.Tensor | None) -> GossipEntries:
        now = self.clock()
        self.expire(now)
        theirs = _records(raw)
        t = self.table
        idx, found = t.locate(theirs["key"])
        my_ver, my_hb = t.ver[idx], t.hb[idx]
        fresh = theirs["age"] <= self.ttl * 1000
        not_me = theirs["key"] != np.uint64(self.me_key or 0)
        same = found & (theirs["ver"] == my_ver)
        adopt = same & (theirs["hb"] > my_hb) & fresh & not_me
        if adopt.any():
            t.hb[idx[adopt]] = theirs["hb"][adopt]
            t.heard[idx[adopt]] = now - theirs["age"][adopt] / 1000
        beats = idx[same & (my_hb > theirs["hb"])]
        want = theirs["key"][(~found | (theirs["ver"] > my_ver)) & fresh & not_me]
        known_there = np.zeros(len(t), bool)
        known_there[idx[found & (theirs["ver"] >= my_ver)]] = True
        send = np.flatnonzero(~known_there)
        if len(send) > MAX_ENTRIES_PER_MESSAGE:
            send = np.array(self.rng.sample(list(send), MAX_ENTRIES_PER_MESSAGE))
        return GossipEntries(entries=[t.wire(i, now) for i in send], beats=_pack(t.records(beats, now)),
                             want=_pack(want.astype(KEY)))

    # ---- merging ---------------------------------------------------------------------------

    def merge(self, entries: list[dict], beats: torch.Tensor | None = None) -> None:
        """Adopt whatever is newer than what this node holds and fresher than the TTL."""
        now = self.clock()
        ttl = self.ttl
        b = _records(beats)
        if len(b):
            idx, found = self.table.locate(b["key"])
            ok = (found & (self.table.ver[idx] == b["ver"]) & (b["hb"] > self.table.hb[idx])
                  & (b["age"] <= ttl * 1000) & (b["key"] != np.uint64(self.me_key or 0)))
            self.table.hb[idx[ok]] = b["hb"][ok]
            self.table.heard[idx[ok]] = now - b["age"][ok] / 1000
        newer: dict[int, PeerEntry] = {}
        for raw in entries:
            try:
                entry = PeerEntry.from_wire(raw, now)
            except EntryError as e:
                log.debug("ignoring a bad gossip entry: %s", e)
                continue
            key = peer_key(entry.peer_id)
            if key == self.me_key or now - entry.heard_at > ttl:
                continue
            held = newer.get(key)
            if held is None:
                i = self.table.index(key)
                held = None if i is None else self.table.export(i)
            if held is None or (entry.version, entry.heartbeat) > (held.version, held.heartbeat):
                newer[key] = entry
                if held is None or entry.version != held.version:
                    self._dirty = True
                    if entry.gone and held is not None and not held.gone:
                        log.info("peer %s (%s) said goodbye", entry.peer_id, entry.endpoint)
        if newer:
            self.table.upsert(newer)
        self._notify()

    # ---- readers ---------------------------------------------------------------------------

    def live(self) -> list[PeerEntry]:
        """Entries of peers believed alive now (tombstones and stale entries excluded)."""
        now = self.clock()
        ok = np.flatnonzero(~self.table.gone & ((now - self.table.heard) <= self.ttl))
        return [self.table.export(i) for i in ok]

    def knows(self, peer_id: str) -> bool:
        """Whether `peer_id` is among the live entries (as `live()` would say)."""
        i = self.table.index(peer_key(peer_id))
        return i is not None and not self.table.gone[i] and self.clock() - self.table.heard[i] <= self.ttl

    def _notify(self, force: bool = False) -> None:
        if self.listener is not None and (force or self._dirty):
            self._dirty = False
            self.listener(self.live())


def _column(entries: list[PeerEntry], attr: str, dtype) -> np.ndarray:
    return np.array([getattr(e, attr) for e in entries], dtype)


def _pack(records: np.ndarray) -> torch.Tensor | None:
    """Records as the flat uint8 tensor a message carries (None when there are none)."""
    return torch.from_numpy(records.view(np.uint8)) if len(records) else None


def _unpack(t: torch.Tensor | None, dtype: np.dtype) -> np.ndarray:
    if t is None:
        return np.empty(0, dtype)
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() % dtype.itemsize:
        raise RequestError(ErrorCode.BAD_REQUEST, f"packed records must be a 1-D uint8 tensor of whole "
                                                  f"{dtype.itemsize}-byte records")
    return t.numpy().view(dtype)


def _records(t: torch.Tensor | None) -> np.ndarray:
    return _unpack(t, DIGEST_RECORD)


def _keys(t: torch.Tensor | None) -> np.ndarray:
    return _unpack(t, KEY)
