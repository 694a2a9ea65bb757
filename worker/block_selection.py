"""Which blocks a worker serves when the user gave only how many (`--num-blocks N`).

Each block's *served throughput* is the sum of the throughputs of the workers
holding it (a worker announcing none counts as the median of those that do).
A new worker takes the N consecutive blocks that are served worst: the window
whose throughputs, sorted, are lexicographically smallest, so gaps (0) are
filled first and then the weakest stretch.

Later it re-checks: it moves when moving makes the swarm *far* better, i.e.
blocks nobody serves get fewer, or, with equally many such blocks, the
weakest block's throughput would grow by MOVE_GAIN (1.5x) or more. Smaller
gains are not worth reloading weights and the churn. When several workers
hold the very same span and would all move, only the one with the smallest
peer id does; the others see the result by gossip before their next check.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from corolla.discovery.entry import PeerEntry

MOVE_GAIN = 1.5
UNKNOWN_THROUGHPUT = 1.0  # when no worker announces a throughput, all count alike


def effective_throughput(peer: PeerEntry, peers: Sequence[PeerEntry]) -> float:
    if peer.throughput > 0:
        return peer.throughput
    known = [p.throughput for p in peers if p.throughput > 0]
    return statistics.median(known) if known else UNKNOWN_THROUGHPUT


def block_throughputs(peers: Sequence[PeerEntry], num_blocks: int) -> np.ndarray:
    """Served throughput of each block of the model."""
    served = np.zeros(num_blocks)
    for peer in peers:
        served[peer.start:min(peer.end, num_blocks)] += effective_throughput(peer, peers)
    return served


def choose_start(served: np.ndarray, n: int) -> int:
    """Start of the n-block window served worst (first such window on ties)."""
    n = min(n, len(served))
    return min(range(len(served) - n + 1), key=lambda i: (sorted(served[i:i + n]), i))


def quality(served: np.ndarray) -> tuple[int, float]:
    """Higher is better: fewer unserved blocks, then a stronger weakest block."""
    return -int(np.count_nonzero(served == 0)), float(served.min()) if len(served) else 0.0


def far_better(new: tuple[int, float], now: tuple[int, float]) -> bool:
    return new[0] > now[0] or (new[0] == now[0] and new[1] >= MOVE_GAIN * now[1] and new[1] > now[1])


def plan_move(peers: Sequence[PeerEntry], me: PeerEntry, num_blocks: int) -> int | None:
    """Where `me` should move its span to (a new start), or None to stay."""
    others = [p for p in peers if p.peer_id != me.peer_id and p.model == me.model]
    n = me.end - me.start
    mine = effective_throughput(me, [*others, me])
    without_me = block_throughputs(others, num_blocks)
    start = choose_start(without_me, n)
    if start == me.start:
        return None
    now, moved = without_me.copy(), without_me.copy()
    now[me.start:me.end] += mine
    moved[start:start + n] += mine
    if not far_better(quality(moved), quality(now)):
        return None
    if any(p.span == me.span and p.peer_id < me.peer_id for p in others):
        return None  # a twin moves first
    return start
