"""The client classes of each family: transformers' own classes with the blocks swapped for RemoteSequential.

Names match Petals' (DistributedLlamaForCausalLM, ...) so a Petals script
switches by changing its import.
"""
from __future__ import annotations

import contextlib

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel

from corolla.client.model import DistributedModelMixin
from corolla.client.remote_cache import RemotePastKeyValues
from corolla.client.remote_sequential import RemoteSequential


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

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, prompts: torch.Tensor | None = None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if isinstance(past_key_values, RemotePastKeyValues):
            session, new = past_key_values.session, hidden.shape[1]
            step_mask = None if attention_mask is None else attention_mask[:, -new:]
            if position_ids is None:
                position_ids = torch.arange(session.position, session.position + new).unsqueeze(0).expand(hidden.shape[0], -1)
            hidden = session.step(hidden, step_mask, position_ids, prompts)
        else:
            past_key_values = None
            hidden = self.layers(hidden, attention_mask, position_ids, prompts)
        return self._output_class(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class DistributedLlamaModel(_RemoteBlocksModel, LlamaModel):
    pass


class DistributedLlamaForCausalLM(DistributedModelMixin, LlamaForCausalLM):
    def __init__(self, config):
        with _without_blocks(config):
            super().__init__(config)
        self.model = DistributedLlamaModel(config)
        self.post_init()

    @property
    def base_model_for_blocks(self):
        return self.model


class DistributedLlamaForSequenceClassification(DistributedModelMixin, LlamaForSequenceClassification):
    def __init__(self, config):
        with _without_blocks(config):
            super().__init__(config)
        self.model = DistributedLlamaModel(config)
        self.post_init()

    @property
    def base_model_for_blocks(self):
        return self.model


class DistributedMixtralModel(_RemoteBlocksModel, MixtralModel):
    _output_class = MoeModelOutputWithPast


class DistributedMixtralForCausalLM(DistributedModelMixin, MixtralForCausalLM):
    def __init__(self, config):
        with _without_blocks(config):
            super().__init__(config)
        self.model = DistributedMixtralModel(config)
        self.post_init()

    @property
    def base_model_for_blocks(self):
        return self.model
