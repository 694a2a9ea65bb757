"""Model families as plugins: what differs between architectures, behind one small registry.

A family says which transformers classes build its blocks and its client-side
model, and how a span of its blocks runs. Everything else (the bus, sessions,
routing, loading) is family-agnostic and looks families up by `config.model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

_FAMILIES: dict[str, "Family"] = {}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    #: builds the module that runs blocks [start, end) of a model: `span(config, start, end)`
    span: Callable[[PretrainedConfig, int, int], nn.Module]
    #: checkpoint prefix of block i, e.g. "model.layers.{i}."
    block_prefix: str
    #: the client's causal-LM class (the Distributed* subclass of transformers' class)
    causal_lm: Callable[[], type] | None = None
    #: the client's sequence-classification class
    sequence_classification: Callable[[], type] | None = None
    #: rewrites one block's checkpoint tensors (names relative to the block) into the block's own layout
    adapt_block: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def register(family: Family) -> Family:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def family_for(config: PretrainedConfig) -> Family:
    return family_of_type(config.model_type)


def family_of_type(model_type: str) -> Family:
    _load_builtin()
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no Corolla family; known: {', '.join(sorted(_FAMILIES))}")
    return family


class UnsupportedModelError(ValueError):
    pass


def _load_builtin() -> None:
    from corolla.models import llama, mixtral  # noqa: F401  (import registers them)
