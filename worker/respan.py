"""Moving a worker to other blocks without reloading the ones it keeps.

The new span reuses the loaded blocks both spans share and loads only the
others. Reused blocks are shallow clones whose attention knows its new index
in the span's KV cache; their weights are the same tensors, so nothing is
copied, and the old span keeps working untouched until the worker swaps.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from corolla.models.registry import family_for
from corolla.worker.loader import load_config, load_span

log = logging.getLogger(__name__)


def respan(span: nn.Module, folder: str | Path, start: int, end: int, dtype: torch.dtype,
           device: str | torch.device) -> nn.Module:
    """A module for blocks [start, end), sharing `span`'s weights where the two overlap."""
    config = load_config(folder)
    config.dtype = dtype
    with torch.device("meta"):
        new = family_for(config).span(config, start, end)
    kept = {span.start + i: layer for i, layer in enumerate(span.layers)}
    layers: dict[int, nn.Module] = {b: kept[b] for b in range(start, end) if b in kept}
    for a, b in _runs([b for b in range(start, end) if b not in kept]):
        loaded = load_span(folder, a, b, dtype, device, progress=False)
        layers.update({a + i: layer for i, layer in enumerate(loaded.layers)})
    new.layers = nn.ModuleList(_at_index(layers[b], i, shared=b in kept) for i, b in enumerate(range(start, end)))
    new.rotary_emb = span.rotary_emb
    new.eval().requires_grad_(False)
    log.info("blocks %d:%d ready: %d reused, %d loaded", start, end, sum(b in kept for b in range(start, end)),
             sum(b not in kept for b in range(start, end)))
    return new


def _at_index(layer: nn.Module, index: int, shared: bool) -> nn.Module:
    """`layer` writing to slot `index` of the KV cache; a clone (same weights) if the old span still uses it."""
    if shared:
        layer = copy.copy(layer)
        layer._modules = dict(layer._modules)
        layer._modules["self_attn"] = copy.copy(layer.self_attn)
    layer.self_attn.layer_idx = index
    return layer


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]"""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
