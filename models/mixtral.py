"""Mixtral family: a sparse mixture-of-experts block behind the same rotary decoder interface."""
import re

import torch
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from corolla.models.registry import Family, register
from corolla.models.rotary import RotarySpan


def _span(config, start, end):
    return RotarySpan(config, start, end, MixtralDecoderLayer, MixtralRotaryEmbedding)


def _adapt_block(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older checkpoints keep one tensor per expert (block_sparse_moe.experts.N.w1/w2/w3);
    transformers' block wants them stacked: gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    if not any(name.startswith(_LEGACY) for name in state):
        return state
    experts = sorted({int(m.group(1)) for name in state if (m := _EXPERT.match(name))})
    out = {name.replace(_LEGACY, "mlp."): t for name, t in state.items() if not _EXPERT.match(name)}
    w = {k: torch.stack([state.pop(f"{_LEGACY}experts.{e}.{k}.weight") for e in experts]) for k in ("w1", "w2", "w3")}
    out["mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
    out["mlp.experts.down_proj"] = w["w2"]
    return out


_LEGACY = "block_sparse_moe."
_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.w[123]\.weight$")


def _causal_lm():
    from corolla.client.families import DistributedMixtralForCausalLM
    return DistributedMixtralForCausalLM


FAMILY = register(Family(name="mixtral", model_types=("mixtral",), span=_span,
                         block_prefix="model.layers.{i}.", causal_lm=_causal_lm,
                         adapt_block=_adapt_block))
