"""Single-token steps of several sessions as one pass through the span.

A decode step reads every weight of the span for one row: on a GPU it is bound by
memory, on a CPU by the per-block overhead, so rows of other sessions queued at
the same time ride along almost for free. Their caches differ in length, so each
session's keys and values are left-padded to the longest into one transformers
DynamicCache, the padding masked out and every row given its own position; after
the pass each session gets back its own cache, padding dropped, with the new
token appended (a view of the pass's tensors until its next step). Rows are
grouped so that padding never exceeds the real tokens of a pass: a long session
beside many short ones must not multiply the cache memory. Only sessions of the
same blocks whose cache layers are all plain DynamicLayers join: sliding-window
caches, and the static caches of CUDA-graph decode (worker/cuda_graph.py), keep
their own path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from corolla.worker.kv_cache import Session


@dataclass
class Row:
    """One session's validated single-token step."""

    session: Session
    hidden: torch.Tensor  # [batch, 1, hidden]
    mask: torch.Tensor | None  # the session's mask with the new token appended; None: no padding
    position_ids: torch.Tensor | None  # [batch, 1]; None: the session's position


def joinable(cache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def groups(rows: list[Row]) -> list[list[Row]]:
    """The rows in passes whose padded cache holds at most twice their real tokens, longest sessions first."""
    passes: list[list[Row]] = []
    real = padded = 0
    for row in sorted(rows, key=lambda r: r.session.position, reverse=True):
        size, length = row.hidden.shape[0], row.session.position + 1
        if passes and padded + size * (passes[-1][0].session.position + 1) <= 2 * (real + size * length):
            passes[-1].append(row)
            real, padded = real + size * length, padded + size * (passes[-1][0].session.position + 1)
        else:
            passes.append([row])
            real = padded = size * length
    return passes


def step_together(rows: list[Row], cache: DynamicCache,
                  run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]
                  ) -> list[torch.Tensor]:
    """Each row's output of `run(hidden, mask, position_ids, cache)` over the rows stacked into the empty span
    cache `cache`. The sessions' own caches change only after the pass has succeeded."""
    lengths = [row.session.position for row in rows]
    longest = max(lengths)
    sizes = [row.hidden.shape[0] for row in rows]
    hidden = torch.cat([row.hidden for row in rows])
    mask = torch.cat([F.pad(_mask(row, length), (longest - length, 0)) for row, length in zip(rows, lengths)])
    position_ids = torch.cat([torch.full((size, 1), length, dtype=torch.long) if row.position_ids is None
                              else row.position_ids.long() for row, size, length in zip(rows, sizes, lengths)])
    for i, layer in enumerate(cache.layers):
        parts = [row.session.cache.layers[i] for row in rows]
        if longest and any(part.get_seq_length() for part in parts):
            keys, values = _stack([(p.keys, p.values) for p in parts], sizes, lengths, longest)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
    out = run(hidden, mask, position_ids, cache)
    ends = torch.tensor(sizes).cumsum(0).tolist()
    for row, length, stop, size in zip(rows, lengths, ends, sizes):
        for layer, batched in zip(row.session.cache.layers, cache.layers):
            if batched.is_initialized:
                if not layer.is_initialized:
                    layer.lazy_initialization(batched.keys, batched.values)
                layer.keys = batched.keys[stop - size:stop, :, longest - length:]
                layer.values = batched.values[stop - size:stop, :, longest - length:]
    return [out[stop - size:stop] for stop, size in zip(ends, sizes)]


def _mask(row: Row, length: int) -> torch.Tensor:
    if row.mask is not None:
        return row.mask.long()
    return torch.ones(row.hidden.shape[0], length + 1, dtype=torch.long)


def _stack(parts: list[tuple[torch.Tensor | None, torch.Tensor | None]], sizes: list[int], lengths: list[int],
           longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the sessions, each left-padded with zeros to `longest` tokens, stacked on the batch."""
    like_k, like_v = next((k, v) for k, v in parts if k is not None and k.numel())
    keys = like_k.new_zeros(sum(sizes), like_k.shape[1], longest, like_k.shape[3])
    values = like_v.new_zeros(sum(sizes), like_v.shape[1], longest, like_v.shape[3])
    at = 0
    for (k, v), size, length in zip(parts, sizes, lengths):
        if length:
            keys[at:at + size, :, longest - length:] = k
            values[at:at + size, :, longest - length:] = v
        at += size
    return keys, values
