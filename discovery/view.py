"""One view of the swarm, whatever found its members.

Sources (gossip, mDNS, a direct info request) each own their set of entries
and replace, put or drop them; readers see, per peer id, the newest entry any
source holds. Several models share one swarm, so readers ask per model.
Sources run on other threads (the bus loop, a worker's loop), hence the lock;
subscribers are called on the thread of the source that changed something.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from corolla.discovery.entry import PeerEntry

log = logging.getLogger(__name__)

Subscriber = Callable[["SwarmView"], None]


class SwarmView:
    def __init__(self, order_endpoints: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None):
        self._order = order_endpoints or (lambda endpoints: endpoints)
        self._lock = threading.RLock()
        self._sources: dict[str, dict[str, PeerEntry]] = {}
        self._subscribers: list[Subscriber] = []
        self.generation = 0  # bumped on every change, so pollers can tell

    # ---- sources ------------------------------------------------------------------------

    def put(self, source: str, entry: PeerEntry) -> None:
        with self._lock:
            entries = self._sources.setdefault(source, {})
            if entry.gone:
                if entries.pop(entry.peer_id, None) is None:
                    return
            else:
                entries[entry.peer_id] = entry.replace(endpoints=self._order(entry.endpoints))
            self.generation += 1
        self._notify()

    def drop(self, source: str, peer_id: str) -> None:
        with self._lock:
            if self._sources.get(source, {}).pop(peer_id, None) is None:
                return
            self.generation += 1
        self._notify()

    def replace(self, source: str, entries: Iterable[PeerEntry]) -> None:
        """Make `entries` the whole of what `source` knows."""
        fresh = {e.peer_id: e.replace(endpoints=self._order(e.endpoints)) for e in entries if not e.gone}
        with self._lock:
            old = self._sources.get(source, {})
            self._sources[source] = fresh
            if _same(old, fresh):
                return
            self.generation += 1
        self._notify()

    # ---- readers ------------------------------------------------------------------------

    def peers(self, model: str | None = None) -> list[PeerEntry]:
        """Live entries (of `model`, or all), sorted by span."""
        with self._lock:
            best: dict[str, PeerEntry] = {}
            for entries in self._sources.values():
                for peer_id, entry in entries.items():
                    if model is not None and entry.model != model:
                        continue
                    held = best.get(peer_id)
                    if held is None or (entry.version, entry.heartbeat) > (held.version, held.heartbeat):
                        best[peer_id] = entry
        return sorted(best.values(), key=lambda e: (e.model, e.start, e.end, e.peer_id))

    def get(self, peer_id: str) -> PeerEntry | None:
        return next((e for e in self.peers() if e.peer_id == peer_id), None)

    def models(self) -> dict[str, int]:
        """Model id -> number of blocks, for every model some live worker serves."""
        return {e.model: e.num_blocks for e in self.peers()}

    def __len__(self) -> int:
        return len(self.peers())

    # ---- subscribers --------------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(view)` after every change; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _notify(self) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(self)
            except Exception:
                log.exception("swarm view subscriber failed")


def _same(a: dict[str, PeerEntry], b: dict[str, PeerEntry]) -> bool:
    """Equal membership and versions: heartbeats alone are not a change worth telling subscribers."""
    return a.keys() == b.keys() and all(a[k].version == b[k].version for k in a)
