"""Whether a span fits its GPU, decided before any of it is loaded.

A worker that runs out of GPU memory halfway through its blocks fails minutes
in with an allocator traceback. Its weights and the KV cache it promises
(`cache_tokens`) follow from config.json alone, so a span that cannot fit is
refused at once, with what it needs and what the GPU has free.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.models.registry import family_for
from corolla.worker.config import ConfigError

GIB = 1 << 30
# bytes a quantized linear weight takes: int8's row scales are negligible; nf4 packs two weights a byte plus one
# byte of (double-quantized) scale per 64-weight block
QUANTIZED_BYTES_PER_WEIGHT = {"int8": 1.0, "nf4": 0.5 + 1 / 64}


def span_bytes(config: PretrainedConfig, start: int, end: int, dtype: torch.dtype, quantization: str
               ) -> tuple[int, int]:
    """Bytes of the weights of blocks [start, end) and of their KV cache per token."""
    with torch.device("meta"):
        span = family_for(config).span(config, start, end)
    size = dtype.itemsize
    weights = 0.0
    for module in span.layers.modules():
        for name, p in module.named_parameters(recurse=False):
            quantized = quantization != "none" and type(module) is nn.Linear and name == "weight"
            weights += p.numel() * (QUANTIZED_BYTES_PER_WEIGHT[quantization] if quantized else size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(weights), 2 * config.num_key_value_heads * head_dim * size * (end - start)


def check_fits(config: PretrainedConfig, start: int, end: int, dtype: torch.dtype, quantization: str,
               cache_tokens: int, free_bytes: int, device: str) -> None:
    weights, per_token = span_bytes(config, start, end, dtype, quantization)
    cache = per_token * cache_tokens
    if weights + cache > free_bytes:
        raise ConfigError(
            f"blocks {start}:{end} need {weights / GIB:.1f} GiB of weights ({str(dtype).removeprefix('torch.')}, "
            f"quantization {quantization}) and {cache / GIB:.1f} GiB of KV cache for cache_tokens {cache_tokens}, "
            f"but {device} has {free_bytes / GIB:.1f} GiB free: serve fewer blocks, lower cache_tokens or quantize")
