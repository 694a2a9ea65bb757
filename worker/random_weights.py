"""Random blocks from config.json alone: benchmark-scale spans without benchmark-scale checkpoints.

A 70B-shaped model has 140 GB of 16-bit weights, more than a GPU machine's disk
holds; its speed does not depend on the values, only on shapes and bytes. So a
benchmark worker can build its span with random-normal weights (std 0.02, never
zeros, which can run faster than real data), made directly on the device block
by block and quantized as they are made. Each block's values depend only on the
seed and the block's index, so any split of the blocks builds the same model.
Never used for real models: their weights come only from safetensors.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.models.registry import family_for
from corolla.worker.quantize import quantize_linears

log = logging.getLogger(__name__)

RANDOM_STD = 0.02
SEED_STRIDE = 1_000_003  # seeds of (seed, block) pairs never collide for models under a million blocks
HEAD_BLOCK = -1  # the "block index" of the client's embeddings, final norm and LM head


def block_generator(seed: int, block: int, device: str | torch.device) -> torch.Generator:
    """The generator of one block's weights (HEAD_BLOCK: the client's), the same whoever builds it."""
    return torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + block + 1)


def fill_random_(module: nn.Module, generator: torch.Generator, dtype: torch.dtype,
                 device: str | torch.device) -> None:
    """Give every parameter of `module` (meta or not) new random values on `device`: N(0, 0.02), except the scales
    of norm layers, N(1, 0.02), so activations keep their size through the blocks."""
    state = {}
    for prefix, sub in module.named_modules():
        mean = 1.0 if "norm" in type(sub).__name__.lower() else 0.0
        for name, p in sub.named_parameters(recurse=False):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            state[f"{prefix}.{name}" if prefix else name] = t.normal_(mean, RANDOM_STD, generator=generator)
    module.load_state_dict(state, strict=False, assign=True)
    module.requires_grad_(False)


def random_span(config: PretrainedConfig, start: int, end: int, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", quantization: str = "none", seed: int = 0,
                nf4_kernel: bool = True) -> nn.Module:
    """Blocks [start, end) of a model shaped like `config`, with random weights, ready to run."""
    log.warning("RANDOM WEIGHTS: blocks %d:%d of this %s-shaped model are random (seed %d), for benchmarks only; "
                "no checkpoint is read and every output is meaningless", start, end, config.model_type, seed)
    family = family_for(config)
    config.dtype = dtype
    with torch.device("meta"):
        span = family.span(config, start, end)
    with torch.device(device):
        span.rotary_emb = type(span.rotary_emb)(config=config)
    for i, block in enumerate(span.layers):
        fill_random_(block, block_generator(seed, start + i, device), dtype, device)
        quantize_linears(block, quantization, nf4_kernel)
    leftover = [name for name, t in [*span.named_parameters(), *span.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"random blocks {start}:{end}: nothing made for {leftover[:3]}")
    span.eval()
    log.info("made random blocks %d:%d as %s on %s (quantization %s)", start, end, dtype, device, quantization)
    return span
