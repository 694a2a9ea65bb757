"""What the swarm knows about one worker: a `PeerEntry`, whichever source (gossip, mDNS) it came from.

The owner alone changes an entry: it bumps `version` when its metadata changes
(span, throughput, free cache) and `heartbeat` once per gossip round. Everyone
else only copies the newest (version, heartbeat) they hear of. `heard_at` is
local: this process's monotonic time at which the heartbeat was current.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MAX_ENDPOINTS = 16
MAX_ADAPTERS = 64
MAX_TEXT = 256
MAX_COUNTER = 2**32 - 1  # versions, heartbeats and ages travel as u32 in gossip digests


class EntryError(ValueError):
    """A peer sent an entry that does not describe a worker."""


@dataclass(frozen=True, slots=True)
class PeerEntry:
    peer_id: str
    endpoints: tuple[str, ...]  # where the worker answers, most likely reachable first
    model: str
    start: int
    end: int
    num_blocks: int  # blocks in the whole model
    dtype: str = ""
    protocol: int = 0  # bus.wire.PROTOCOL_VERSION the worker speaks
    throughput: float = 0.0  # inference tokens/s one of its blocks processes (0: unknown)
    cache_tokens_free: int = 0
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters it serves (see worker/adapters.py)
    max_length: int = 0  # the longest inference session it opens (0: unknown)
    max_batch_size: int = 0  # the largest batch it takes (0: unknown)
    version: int = 0
    heartbeat: int = 0
    gone: bool = False  # a tombstone: the worker said goodbye
    heard_at: float = 0.0  # local monotonic time of `heartbeat`; never sent

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end

    def serves(self, block: int) -> bool:
        return self.start <= block < self.end

    def replace(self, **changes: Any) -> "PeerEntry":
        return dataclasses.replace(self, **changes)

    def to_wire(self, age_ms: int, heartbeat: int | None = None) -> dict:
        """The msgpack-able form; `age_ms` says how long ago the heartbeat (default: ours) was current."""
        return {"id": self.peer_id, "ep": list(self.endpoints), "model": self.model, "start": self.start,
                "end": self.end, "n": self.num_blocks, "dtype": self.dtype, "proto": self.protocol,
                "tp": float(self.throughput), "cache": self.cache_tokens_free, "ad": list(self.adapters),
                "ml": self.max_length, "mb": self.max_batch_size, "ver": self.version,
                "hb": self.heartbeat if heartbeat is None else heartbeat, "age": max(0, min(int(age_ms), MAX_COUNTER)),
                "gone": self.gone}

    @classmethod
    def from_wire(cls, d: Any, now: float) -> "PeerEntry":
        """Validate a peer's dict; raises EntryError for anything that is not a sane entry."""
        if not isinstance(d, dict):
            raise EntryError("an entry must be a map")
        try:
            entry = cls(peer_id=_text(d["id"]), endpoints=_endpoints(d["ep"]), model=_text(d["model"]),
                        start=_count(d["start"]), end=_count(d["end"]), num_blocks=_count(d["n"]),
                        dtype=_text(d.get("dtype", ""), empty=True), protocol=_count(d.get("proto", 0)),
                        throughput=_rate(d.get("tp", 0.0)), cache_tokens_free=_count(d.get("cache", 0)),
                        adapters=_adapters(d.get("ad", [])), max_length=_count(d.get("ml", 0)),
                        max_batch_size=_count(d.get("mb", 0)), version=_count(d["ver"]), heartbeat=_count(d["hb"]),
                        gone=bool(d.get("gone", False)), heard_at=now - _count(d["age"]) / 1000)
        except KeyError as e:
            raise EntryError(f"entry lacks {e.args[0]!r}") from None
        if not entry.start < entry.end <= entry.num_blocks:
            raise EntryError(f"span {entry.start}:{entry.end} of {entry.num_blocks} blocks is empty or out of range")
        return entry


def _text(v: Any, empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > MAX_TEXT or (not v and not empty):
        raise EntryError(f"expected a string of 1..{MAX_TEXT} characters, got {v!r:.40}")
    return v


def _count(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNTER:
        raise EntryError(f"expected an integer in 0..{MAX_COUNTER}, got {v!r:.40}")
    return v


def _rate(v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise EntryError(f"expected a finite non-negative number, got {v!r:.40}")
    return float(v)


def _adapters(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_ADAPTERS:
        raise EntryError(f"expected a list of at most {MAX_ADAPTERS} adapter names")
    return tuple(_text(name) for name in v)


def _endpoints(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not 0 < len(v) <= MAX_ENDPOINTS:
        raise EntryError(f"expected 1..{MAX_ENDPOINTS} endpoints")
    return tuple(_text(e) for e in v)
