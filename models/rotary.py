"""A span of a rotary-embedding decoder (Llama, Mistral, Mixtral, ...), run as transformers runs it.

The blocks are transformers' own classes; this module only reproduces the part of
the family's `Model.forward` that surrounds them (position ids, causal mask,
rotary tables), so that a chain of spans computes what the whole model computes.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


class RotarySpan(nn.Module):
    def __init__(self, config: PretrainedConfig, start: int, end: int, block_cls: type, rotary_cls: type):
        super().__init__()
        # Outside from_pretrained nobody picks the attention kernel; choose what a local model would use.
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"
        self.start, self.end = start, end
        # The KV cache and the mask see a model of just this span's blocks, indexed from 0.
        self.span_config = copy.deepcopy(config)
        self.span_config.num_hidden_layers = end - start
        if getattr(config, "layer_types", None):
            self.span_config.layer_types = list(config.layer_types[start:end])
        self.layers = nn.ModuleList(block_cls(config, start + i) for i in range(end - start))
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i
        self.rotary_emb = rotary_cls(config=config)
        self._mask_fn: Callable = (create_sliding_window_causal_mask
                                   if getattr(config, "sliding_window", None) else create_causal_mask)

    def checkpoint_key(self, key: str, block_prefix: str) -> tuple[int, str] | None:
        """(local block index, name within the block) of a checkpoint tensor, or None if it is not ours."""
        for i in range(self.end - self.start):
            prefix = block_prefix.format(i=self.start + i)
            if key.startswith(prefix):
                return i, key[len(prefix):]
        return None

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.span_config)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DynamicCache | None = None,
                prompts: torch.Tensor | None = None, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Run blocks [first, last) of the span (local indices); `prompts[i]` is added to the prefix before block i."""
        last = len(self.layers) if last is None else last
        # A session on the tail of the span never fills the cache of its first blocks: its past length is that
        # of block `first`, the first one it runs.
        if position_ids is None:
            past = cache.get_seq_length(first) if cache is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = self._mask_fn(config=self.span_config, inputs_embeds=hidden, attention_mask=attention_mask,
                             past_key_values=cache, position_ids=position_ids, layer_idx=first)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for i in range(first, last):
            if prompts is not None:
                pre = prompts.shape[2]
                hidden = torch.cat([hidden[:, :pre] + prompts[i - first], hidden[:, pre:]], dim=1)
            hidden = self.layers[i](hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                                    use_cache=cache is not None, position_embeddings=position_embeddings)
        return hidden
