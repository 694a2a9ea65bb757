"""The span loader: only this worker's blocks are read from the checkpoint, never the whole model.

The span is built on the meta device (no memory), then each of its tensors is
read from whichever safetensors shard holds it (single file or sharded with an
index) and assigned in place. Weights come only from safetensors, never pickle.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from corolla.models.registry import family_for
from corolla.worker.quantize import quantize_linears

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The model folder lacks what a span needs."""


def load_config(folder: str | Path) -> PretrainedConfig:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: is it a Hugging Face model folder? (see `corolla convert`)")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def tensor_locations(folder: str | Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor name."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_span(folder: str | Path, start: int, end: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", progress: bool = True, quantization: str = "none",
              nf4_kernel: bool = True) -> torch.nn.Module:
    """Blocks [start, end) of the model in `folder`, ready to run (eval mode, no grads on weights); with
    `quantization` (int8, nf4: CUDA only) each block's linear layers are quantized as it reaches the device
    (`nf4_kernel`: see quantize_linears)."""
    config = load_config(folder)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise CheckpointError(f"span {start}:{end} is outside the model's {config.num_hidden_layers} blocks")
    family = family_for(config)
    config.dtype = dtype
    with torch.device("meta"):
        span = family.span(config, start, end)
    # Buffers computed at construction (rotary tables) are not in the checkpoint: rebuild them for real.
    with torch.device(device):
        rotary = type(span.rotary_emb)(config=config)
    wanted: dict[Path, list[tuple[str, int, str]]] = {}
    for key, file in tensor_locations(folder).items():
        local = span.checkpoint_key(key, family.block_prefix)
        if local is not None:
            wanted.setdefault(file, []).append((key, *local))
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(end - start)]
    total = sum(len(entries) for entries in wanted.values())
    with tqdm(total=total, desc=f"loading blocks {start}:{end}", unit="tensor", disable=not progress) as bar:
        for file, entries in wanted.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key, block, name in entries:
                    blocks[block][name] = f.get_tensor(key).to(dtype=dtype)
                    bar.update()
    if family.adapt_block is not None:
        blocks = [family.adapt_block(block) for block in blocks]
    found = {f"layers.{i}.{name}" for i, block in enumerate(blocks) for name in block}
    missing = {name for name, _ in span.named_parameters() if not name.startswith("rotary_emb.")} - found
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors of blocks {start}:{end}, e.g. {sorted(missing)[0]}")
    for layer, block in zip(span.layers, blocks):  # block by block: a quantized span never holds all 16-bit weights
        layer.load_state_dict({name: t.to(device) for name, t in block.items()}, strict=False, assign=True)
        quantize_linears(layer, quantization, nf4_kernel)
    leftover = [name for name, p in span.named_parameters() if p.is_meta and not name.startswith("rotary_emb.")]
    if leftover:
        raise CheckpointError(f"blocks {start}:{end}: no weights for {leftover[:3]}")
    span.rotary_emb = rotary
    span.eval().requires_grad_(False)
    log.info("loaded blocks %d:%d of %s (%d tensors) as %s on %s (quantization %s)", start, end, folder, total, dtype,
             device, quantization)
    return span
