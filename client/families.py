"""The client classes of each family: transformers' own classes with the blocks swapped for RemoteSequential.

Names match Petals' (DistributedLlamaForCausalLM, ...) so a Petals script
switches by changing its import.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel

from corolla.client.model import DistributedModelMixin
from corolla.client.remote_cache import RemotePastKeyValues
from corolla.client.remote_sequential import RemoteSequential


TUNING_MODES = ("ptune", "deep_ptune")


@contextlib.contextmanager
def _without_blocks(config):
    """Let a transformers class build everything but its blocks (a 70B model's blocks never exist here)."""
    blocks, config.num_hidden_layers = config.num_hidden_layers, 0
    try:
        yield blocks
    finally:
        config.num_hidden_layers = blocks


class _RemoteBlocksModel:
    """Replaces a rotary decoder's `Model`: local embeddings and norm around remote blocks."""

    _output_class = BaseModelOutputWithPast

    def __init__(self, config):
        with _without_blocks(config) as blocks:
            super().__init__(config)
        self.layers = RemoteSequential(blocks)

    tuning_mode: str | None = None
    pre_seq_len: int = 0

    def init_prompts(self, tuning_mode: str | None, pre_seq_len: int) -> None:
        """Petals' tuning modes: `ptune` prepends trainable prompt embeddings; `deep_ptune` also adds a
        trainable prompt to the prefix before every block (sent with each request, applied on the workers)."""
        if tuning_mode is None:
            return
        if tuning_mode not in TUNING_MODES or pre_seq_len <= 0:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES} with pre_seq_len > 0")
        hidden, dtype = self.config.hidden_size, self.embed_tokens.weight.dtype
        self.tuning_mode, self.pre_seq_len = tuning_mode, pre_seq_len
        self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden, dtype=dtype)
        nn.init.normal_(self.prompt_embeddings.weight, std=self.config.initializer_range)
        if tuning_mode == "deep_ptune":  # zeros: training starts from the plain ptune model
            self.deep_prompt_embeddings = nn.Embedding(pre_seq_len, len(self.layers) * hidden, dtype=dtype)
            nn.init.zeros_(self.deep_prompt_embeddings.weight)

    def _prompts(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompts = self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
        if self.tuning_mode != "deep_ptune":
            return prompts, None
        deep = self.deep_prompt_embeddings.weight.view(self.pre_seq_len, len(self.layers), -1)
        return prompts, deep.permute(1, 0, 2).unsqueeze(1)  # [blocks, 1, prefix, hidden], broadcast over the batch

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch = hidden.shape[0]
        session = past_key_values.session if isinstance(past_key_values, RemotePastKeyValues) else None
        prefix, deep = 0, None
        if self.tuning_mode and (session is None or session.position == 0):
            prompts, deep = self._prompts(batch)
            prefix = self.pre_seq_len
            hidden = torch.cat([prompts.to(hidden.dtype), hidden], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
        if position_ids is not None and self.tuning_mode:  # real tokens sit after the prefix
            position_ids = position_ids + self.pre_seq_len
            if prefix:
                position_ids = torch.cat([torch.arange(prefix).expand(batch, -1), position_ids], dim=1)
        if session is not None:
            new = hidden.shape[1]
            step_mask = None if attention_mask is None else attention_mask[:, -new:]
            if position_ids is None:
                position_ids = torch.arange(session.position, session.position + new).unsqueeze(0).expand(batch, -1)
            if prefix:
                session.prefix_length = prefix
            hidden = session.step(hidden, step_mask, position_ids, deep)
        else:
            past_key_values = None
            hidden = self.layers(hidden, attention_mask, position_ids, deep)
        return self._output_class(last_hidden_state=self.norm(hidden[:, prefix:]), past_key_values=past_key_values)


class _DistributedHead(DistributedModelMixin):
    """A transformers *For* class (LM head, classifier) over a `_RemoteBlocksModel` instead of its own blocks."""

    _blocks_model: type

    def __init__(self, config):
        with _without_blocks(config):
            super().__init__(config)
        self.model = self._blocks_model(config)
        self.post_init()

    @property
    def base_model_for_blocks(self):
        return self.model


class DistributedLlamaModel(_RemoteBlocksModel, LlamaModel):
    pass


class DistributedLlamaForCausalLM(_DistributedHead, LlamaForCausalLM):
    _blocks_model = DistributedLlamaModel


class DistributedLlamaForSequenceClassification(_DistributedHead, LlamaForSequenceClassification):
    _blocks_model = DistributedLlamaModel
    _trainable_heads = ("score",)


class DistributedMixtralModel(_RemoteBlocksModel, MixtralModel):
    _output_class = MoeModelOutputWithPast


class DistributedMixtralForCausalLM(_DistributedHead, MixtralForCausalLM):
    _blocks_model = DistributedMixtralModel
