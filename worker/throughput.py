"""How fast this worker runs a block, so routing and block selection can compare workers.

Measured once at start: single-token inference steps through the span's first
block (batch 1, a warm KV cache), the shape of interactive generation.
"""
from __future__ import annotations

import time

import torch

WARMUP_STEPS = 2
TIMED_STEPS = 8


def measure_throughput(span: torch.nn.Module, hidden_size: int, dtype: torch.dtype, device: str | torch.device) -> float:
    """Inference tokens per second of one block."""
    hidden = torch.randn(1, 1, hidden_size, dtype=dtype, device=device)
    cache = span.new_cache()
    with torch.inference_mode():
        for _ in range(WARMUP_STEPS):
            span(hidden, cache=cache, first=0, last=1)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(TIMED_STEPS):
            span(hidden, cache=cache, first=0, last=1)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    return TIMED_STEPS / (time.perf_counter() - started)
