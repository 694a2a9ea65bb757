"""Which codec activations take over one link: raw where the link is fast or the payload small, int8 where
the transfer dominates.

Measured on SmolLM2-135M's hidden states (perf/RESULTS.md): lz4 shrinks them 1.00x, so it is never
chosen; blockwise int8 sends 1.94x fewer bytes than fp16 for a relative error of about 1.4e-2 per hop.
That error is only worth paying where the bytes it saves take long to send: int8 is chosen when the
transfer time it saves, less its encode and decode CPU time, reaches MIN_SAVING_S per message. Below
that the saving is smaller than one decode step's compute on a GPU worker (an 8B step takes 13-20 ms)
and hides among per-message costs. So a decode step (one vector per sequence) stays raw on any link,
and so does everything on loopback and gigabit LANs but multi-megabyte batches; a batch of thousands of
tokens on 100 Mbit/s goes int8.
"""
from __future__ import annotations

from corolla.compression.codecs import BLOCK, INT8_DEFAULT_SCALE

__all__ = ["AUTO", "MIN_SAVING_S", "choose", "wire_bytes"]

AUTO = "auto"
MIN_SAVING_S = 0.010
# int8 encode + decode of float32 values: 0.8 ns each on a 2-core EPYC (perf/bench_codecs.py); doubled for
# a busy or slower host, which only makes int8 rarer on fast links, where it saves least.
INT8_CPU_S_PER_VALUE = 2e-9


def wire_bytes(codec: str, numel: int, itemsize: int) -> int:
    """Frame bytes of `numel` float values: raw at `itemsize` bytes each; int8 one byte each plus fp16 block scales."""
    if codec == "int8":
        return numel + -(-numel // BLOCK) * INT8_DEFAULT_SCALE.itemsize
    return numel * itemsize


def choose(bandwidth: float | None, numel: int, itemsize: int) -> str:
    """"raw" or "int8" for `numel` float values that travel raw at `itemsize` bytes each over a link of
    `bandwidth` bytes/s (None: not measured, so raw, as without a policy)."""
    if bandwidth is None or numel == 0:
        return "raw"
    saved_bytes = wire_bytes("raw", numel, itemsize) - wire_bytes("int8", numel, itemsize)
    saving_s = saved_bytes / bandwidth - numel * INT8_CPU_S_PER_VALUE
    return "int8" if saving_s >= MIN_SAVING_S else "raw"
