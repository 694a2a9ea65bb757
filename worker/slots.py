"""Batch-1 sessions' KV caches as rows of one tensor, so their decode steps share one CUDA graph.

A decode step on a GPU reads every weight of the span whatever its batch, so steps
of several sessions cost little more than one, but only if they run as one pass;
and on a GPU a pass must replay a CUDA graph to be fast, which wants fixed
addresses. So the sessions a pool admits live in its slots: per layer one key and
one value tensor [slots + 1, kv heads, length, head dim], a session owning one row.
A pass of b rows reads rows 0..b-1 up to l tokens, as views of those tensors, and
writes each stepping row's new key and value at that session's own position;
rows of sessions not in the pass write into the extra scratch row instead, so any
set of sessions steps as one graph. One graph is captured per (b, l) bucket, both
powers of two (or the pool's full size), and serves every session; new sessions
take the lowest free slot, which keeps b small. Prefill and any other step run
eagerly on the session's own row (a StaticSpanCache of views into it).
"""
from __future__ import annotations

import heapq
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from corolla.worker.cuda_graph import StaticSpanCache, warm_up_side_stream

log = logging.getLogger(__name__)

MIN_SLOT_LENGTH = 128  # a pool of shorter slots would admit almost no session
MIN_ATTENDED = 64  # the smallest length bucket a pass attends over


@dataclass
class SlotRow:
    """One session's single-token step in a pool pass."""

    slot: int
    position: int  # tokens already in the slot: the new token's key and value are written there
    hidden: torch.Tensor  # [1, 1, hidden], on the host
    position_ids: torch.Tensor | None  # [1, 1] rotary position; None: `position`


class SlotSessionCache(StaticSpanCache):
    """A pooled session's cache: every layer a view of its slot's row, for the steps that run eagerly.

    The session's position is the truth (pool passes do not count tokens here): `at` sets it before an eager step,
    and a rollback needs nothing, since tokens past the position are masked and written over."""

    def __init__(self, pool: "SlotPool", slot: int):
        super().__init__(pool.num_layers, pool.length)
        self.pool, self.slot = pool, slot
        for layer, keys, values in zip(self.layers, pool.keys, pool.values):
            layer.adopt(keys[slot:slot + 1], values[slot:slot + 1])

    def at(self, position: int) -> "SlotSessionCache":
        for layer in self.layers:
            layer.truncate(position)
        return self

    def crop(self, length: int) -> None:
        pass

    def release(self) -> None:
        self.pool.release(self.slot)


class _PassLayer(CacheLayerMixin):
    """One layer of a pool pass: writes the rows' new keys and values into their slots, attends over b x l."""

    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, b: int, l: int, write_slot: torch.Tensor,
                 write_position: torch.Tensor):
        super().__init__()
        self.all_keys, self.all_values = keys, values
        self.keys, self.values = keys[:b, :, :l], values[:b, :, :l]
        self.write_slot, self.write_position = write_slot, write_position
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.all_keys[self.write_slot, :, self.write_position] = key_states[:, :, 0]
        self.all_values[self.write_slot, :, self.write_position] = value_states[:, :, 0]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    get_max_cache_shape = get_max_length  # the same method, as transformers before 5.2x named it


class _Pass:
    """The static inputs and output of one (b, l) bucket's pass; on CUDA, its captured graph."""

    def __init__(self, pool: "SlotPool", b: int, l: int):
        self.pool, self.b, self.l = pool, b, l
        device = pool.device
        self.hidden = torch.zeros(b, 1, pool.hidden_size, dtype=pool.dtype, device=device)
        # per row: rotary position, slot written, position written (the row attends to positions up to it)
        self.ints = torch.zeros(3, b, dtype=torch.long, device=device)
        self.ints[1] = pool.slots  # every row idle: writes go to the scratch row
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def run(self) -> torch.Tensor:
        positions, write_slot, write_position = self.ints
        attended = torch.arange(self.l, device=self.pool.device) <= write_position[:, None]
        cache = Cache(layers=[_PassLayer(k, v, self.b, self.l, write_slot, write_position)
                              for k, v in zip(self.pool.keys, self.pool.values)])
        return self.pool.step(self.hidden, attended[:, None, None, :], positions[:, None], cache)

    def capture(self, graph_pool) -> None:
        warm_up_side_stream(self.pool.device, self.run)  # the inputs are all idle: warm-ups write the scratch row
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=graph_pool, capture_error_mode="thread_local"):
            self.out = self.run()
        self.graph = graph

    def __call__(self, hidden: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
        self.hidden.copy_(hidden)
        self.ints.copy_(ints)
        if self.graph is None:
            return self.run().to("cpu")
        self.graph.replay()
        return self.out.to("cpu")  # the copy waits for the replay; replies are encoded from host memory


class SlotPool:
    """`slots` rows of `length` tokens for batch-1 sessions of the whole span, and the passes that step them."""

    def __init__(self, step: Callable, num_layers: int, slots: int, length: int, kv_heads: int, head_dim: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, graph_pool: Callable | None = None):
        self.step = step  # step(hidden, 4D mask, position_ids, cache) -> hidden: the span's forward
        self.num_layers, self.slots, self.length = num_layers, slots, length
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        shape = (slots + 1, kv_heads, length, head_dim)  # the last row: scratch for rows not in a pass
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(slots))
        self._lock = threading.Lock()  # sessions open and close on the event loop, passes run on the compute thread
        self._passes: dict[tuple[int, int], _Pass] = {}
        self._graph_pool = graph_pool  # CUDA: returns the memory pool passes are captured into; None: eager passes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> SlotSessionCache | None:
        """A free slot's cache (the lowest slot, so passes stay narrow), or None if every slot is taken."""
        with self._lock:
            if not self._free:
                return None
            slot = heapq.heappop(self._free)
        return SlotSessionCache(self, slot)

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free:
                heapq.heappush(self._free, slot)

    def run(self, rows: list[SlotRow]) -> list[torch.Tensor]:
        """Each row's output [1, 1, hidden] (on the host) of one pass over the slots up to the highest row's."""
        b = _bucket(max(row.slot for row in rows) + 1, self.slots)
        l = _bucket(max(row.position for row in rows) + 1, self.length, MIN_ATTENDED)
        hidden = torch.zeros(b, 1, self.hidden_size, dtype=self.dtype)
        ints = torch.zeros(3, b, dtype=torch.long)
        ints[1] = self.slots
        for row in rows:
            hidden[row.slot] = row.hidden[0]
            ints[0, row.slot] = row.position if row.position_ids is None else int(row.position_ids.reshape(-1)[0])
            ints[1, row.slot], ints[2, row.slot] = row.slot, row.position
        out = self._pass(b, l)(hidden, ints)
        return [out[row.slot:row.slot + 1] for row in rows]

    def _pass(self, b: int, l: int) -> _Pass:
        found = self._passes.get((b, l))
        if found is None:
            found = self._passes[(b, l)] = _Pass(self, b, l)
            if self._graph_pool is not None:
                try:
                    found.capture(self._graph_pool())
                except Exception as e:  # the same pass, eagerly
                    log.warning("capturing a pass of %d slots x %d tokens failed (%s: %s); it runs eagerly",
                                b, l, type(e).__name__, e)
        return found


def _bucket(n: int, cap: int, smallest: int = 1) -> int:
    """The power of two at least n (and at least `smallest`), at most `cap`."""
    return min(cap, max(smallest, 1 << (n - 1).bit_length()))


def slot_length(max_length: int, cache_tokens: int, slots: int) -> int:
    """A pool's slot length: a session's longest, unless the pool would then take more than half the cache budget;
    0 where that leaves slots too short to be worth it."""
    length = min(max_length, cache_tokens // (2 * slots))
    return length if length >= MIN_SLOT_LENGTH else 0


def span_step(span: nn.Module) -> Callable:
    def step(hidden, mask, position_ids, cache):
        return span(hidden, attention_mask=mask, position_ids=position_ids, cache=cache)
    return step
