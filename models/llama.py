"""Llama family: Llama 2/3 and SmolLM2 shapes (GQA and RoPE scaling come with the blocks)."""
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from corolla.models.registry import Family, register
from corolla.models.rotary import RotarySpan


def _span(config, start, end):
    return RotarySpan(config, start, end, LlamaDecoderLayer, LlamaRotaryEmbedding)


def _causal_lm():
    from corolla.client.families import DistributedLlamaForCausalLM
    return DistributedLlamaForCausalLM


def _classifier():
    from corolla.client.families import DistributedLlamaForSequenceClassification
    return DistributedLlamaForSequenceClassification


FAMILY = register(Family(name="llama", model_types=("llama",), span=_span,
                         block_prefix="model.layers.{i}.", causal_lm=_causal_lm,
                         sequence_classification=_classifier))
