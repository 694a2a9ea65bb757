"""Single-token decode steps of a GPU worker as CUDA graph replays.

Eager PyTorch launches every small kernel of a decode step from Python (dozens
per block), so a batch-1 step on a fast GPU is bound by launch overhead rather
than by reading the weights. A session that qualifies (CUDA, batch 1, the whole
span, no adapter) gets a static KV cache when it opens: prefill and any other
step still run eagerly into it, and its single-token steps replay a graph
captured at its first such step, reading and appending to that cache in place.
For unquantized weights the step is compiled first (inductor fuses the norms,
rotary and activations, rounding each bf16 intermediate as eager does, so the
tokens stay those of eager transformers), then captured all the same;
compilation happens at start-up, so no request waits for it. Whatever fails to compile or capture falls back to the
eager path, which computes the same function.
"""
from __future__ import annotations

import logging
import threading
import time

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # steps run before a thread's first capture: lazy allocations and library handles stay out of graphs
WARMUP_LENGTH = 16  # tokens of the scratch cache that warm-ups and the compilation run on


class StaticSpanLayer(StaticLayer):
    """transformers' StaticLayer, minus dynamo's static-address marks (they keep every session's cache alive for
    the life of the process), plus truncation for the worker's rollback."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (*key_states.shape[:2], self.max_cache_len)
        self.adopt(key_states.new_zeros(*shape, key_states.shape[-1]),
                   value_states.new_zeros(*shape, value_states.shape[-1]))

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold these tensors [batch, heads, max_cache_len, head dim] as the cache (views of a pool's slot, say)."""
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The length read off the tensor: a compiled step then treats it as a size, not a constant, so one
        # compilation serves sessions of every max_length.
        return (self.keys.shape[2] if self.is_initialized else self.max_cache_len), 0

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens; later slots are masked out and written over by the next steps."""
        self.cumulative_length.fill_(length)


class StaticSpanCache(Cache):
    """A session's KV cache of its full max_length, allocated at its first step (the size its budget reserved)."""

    def __init__(self, num_layers: int, max_length: int):
        super().__init__(layers=[StaticSpanLayer(max_cache_len=max_length) for _ in range(num_layers)])
        self.graph: DecodeGraph | None = None  # captured at the session's first single-token step

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens (the worker's rollback passes the absolute position); a negative value
        removes that many from the end instead (transformers' newer convention)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.truncate(length if length >= 0 else max(int(layer.get_seq_length()) + length, 0))


def make_current(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device. CUDA keeps the current device per thread, and graph
    capture streams and argument-less synchronizes use it: a worker on cuda:1 whose compute thread left it at cuda:0
    would capture its graphs on cuda:0's stream (an empty graph) and open a context on a GPU it does not use."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def graphable(batch_size: int, adapter: str, blocks: tuple[int, int], span: tuple[int, int]) -> bool:
    """Whether a session's single-token steps can replay a graph (its own or a slot pool's): batch 1, no adapter,
    the worker's whole span."""
    return batch_size == 1 and not adapter and blocks == span


class DecodeGraph:
    """One session's single-token step over its static cache, captured once and replayed for every token."""

    def __init__(self, step, cache: StaticSpanCache, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 pool):
        self.hidden = torch.zeros(1, 1, hidden_size, dtype=dtype, device=device)
        self.position_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop thread may copy another session's output to the host meanwhile
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = step(self.hidden, self.position_ids, cache)

    def replay(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.hidden.copy_(hidden)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        return self.out.to("cpu")  # the copy waits for the replay; the reply is encoded from host memory


class GraphDecoder:
    """A worker's CUDA-graph decode path: which sessions get static caches, and their steps as graph replays."""

    def __init__(self, span: nn.Module, start: int, end: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, compile: bool = False):
        self.span, self.start, self.end = span, start, end
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.num_layers = len(span.layers)
        self._pool = None  # one memory pool for every session's graph: replays never overlap (one compute thread)
        self._pool_keeper: torch.cuda.CUDAGraph | None = None
        self._warm_threads: set[int] = set()  # threads that ran the step before capturing it
        self._step = self._eager_step
        if compile:
            self._compile()

    def _eager_step(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        return self.span(hidden, position_ids=position_ids, cache=cache)

    def _compile(self) -> None:
        """Compile the step at start-up, with the cache length symbolic so that no session recompiles."""
        started = time.perf_counter()
        # Round every fused bf16/fp16 intermediate as eager does: the compiled step then drifts from the eager
        # one only by the order of its reductions, not by the precision of its intermediates.
        compiled = torch.compile(self._eager_step, options={"emulate_precision_casts": True})
        try:
            with torch.inference_mode():
                self._warm_up(compiled, dynamic_length=True)
        except Exception as e:  # inductor or a block it cannot trace: graphs of the eager step still pay off
            log.warning("compiling the decode step failed (%s: %s); capturing the eager step instead",
                        type(e).__name__, e)
            return
        self._step = compiled
        log.info("decode step compiled in %.1f s", time.perf_counter() - started)

    def new_cache(self, batch_size: int, start: int, end: int, adapter: str, max_length: int) -> Cache:
        """A static cache for sessions whose single-token steps can replay a graph; the span's own cache otherwise."""
        if graphable(batch_size, adapter, (start, end), (self.start, self.end)):
            return StaticSpanCache(self.num_layers, max_length)
        return self.span.new_cache()

    def step(self, cache: Cache, position: int, hidden: torch.Tensor, position_ids: torch.Tensor | None
             ) -> torch.Tensor | None:
        """The output of one new token through the span as a graph replay, or None where the eager path must run
        (not a static-cache session, nothing cached yet, or the capture failed). Call in inference mode."""
        if not isinstance(cache, StaticSpanCache) or position == 0 or hidden.shape[:2] != (1, 1):
            return None
        if cache.graph is None:
            cache.graph = self._capture(cache)
            if cache.graph is None:
                return None
        if position_ids is None:
            position_ids = torch.tensor([[position]])
        return cache.graph.replay(hidden, position_ids)

    def _capture(self, cache: StaticSpanCache) -> DecodeGraph | None:
        started = time.perf_counter()
        try:
            if threading.get_ident() not in self._warm_threads:  # CUDA libraries set up per thread, not in a graph
                self._warm_up(self._step)
                self._warm_threads.add(threading.get_ident())
            graph = DecodeGraph(self._step, cache, self.hidden_size, self.dtype, self.device,
                                self.shared_pool())
        except Exception as e:
            if self._step == self._eager_step:
                log.warning("capturing a decode step failed (%s: %s); this session steps eagerly",
                            type(e).__name__, e)
                return None
            log.warning("capturing the compiled decode step failed (%s: %s); capturing the eager step from now on",
                        type(e).__name__, e)
            self._step = self._eager_step
            self._warm_threads.clear()
            return self._capture(cache)
        log.debug("decode graph captured in %.1f ms", 1e3 * (time.perf_counter() - started))
        return graph

    def shared_pool(self):
        """The memory pool of every graph of this worker (sessions' and the slot pool's). The allocator keeps a pool
        only while a graph captured into it lives, and capturing into a pool whose graphs are all gone fails; a
        one-kernel graph that lives as long as this decoder keeps the pool for the sessions to come."""
        if self._pool is None:
            pool, keeper = torch.cuda.graph_pool_handle(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(keeper, pool=pool, capture_error_mode="thread_local"):
                torch.ones(1, device=self.device)
            self._pool, self._pool_keeper = pool, keeper
        return self._pool

    def _warm_up(self, step, dynamic_length: bool = False) -> None:
        """Single-token steps on a scratch cache (filled eagerly first, as sessions' are), on a side stream, as CUDA
        graphs want before a capture. No random numbers: a failed capture leaves the generator unusable."""
        cache = StaticSpanCache(self.num_layers, WARMUP_LENGTH)
        hidden = torch.full((1, 1, self.hidden_size), 0.5, dtype=self.dtype, device=self.device)
        positions = iter(range(1, 1 + WARMUP_STEPS))

        def run():
            if not cache.layers[0].is_initialized:
                self._eager_step(hidden, torch.zeros(1, 1, dtype=torch.long, device=self.device), cache)
                if dynamic_length:
                    for layer in cache.layers:
                        torch._dynamo.mark_dynamic(layer.keys, 2)
                        torch._dynamo.mark_dynamic(layer.values, 2)
            step(hidden, torch.tensor([[next(positions)]], device=self.device), cache)

        warm_up_side_stream(self.device, run)


def warm_up_side_stream(device: torch.device, run, times: int = WARMUP_STEPS) -> None:
    """Run `run()` a few times on a side stream, as CUDA graphs want before a capture of it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(times):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
