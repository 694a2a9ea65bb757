"""Mixtral family: a sparse mixture-of-experts block behind the same rotary decoder interface."""
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from corolla.models.registry import Family, register
from corolla.models.rotary import RotarySpan


def _span(config, start, end):
    return RotarySpan(config, start, end, MixtralDecoderLayer, MixtralRotaryEmbedding)


def _causal_lm():
    from corolla.client.families import DistributedMixtralForCausalLM
    return DistributedMixtralForCausalLM


FAMILY = register(Family(name="mixtral", model_types=("mixtral",), span=_span,
                         block_prefix="model.layers.{i}.", causal_lm=_causal_lm))
