"""The client's half of a model: embeddings, final norm and LM head locally, the blocks remote.

`DistributedModelMixin` turns a transformers causal-LM class into one whose
blocks are a RemoteSequential; from_pretrained loads only the local weights
(transformers' own loader, told to ignore the blocks' tensors), and generate()
runs over a remote inference session so each new token sends one hidden-state
vector per span, not the whole prefix.
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.security import Security
from corolla.client.config import ClientConfig
from corolla.client.remote_cache import RemotePastKeyValues
from corolla.client.remote_sequential import RemoteSequential
from corolla.client.routing import STATIC, StaticRouter, SwarmRouter
from corolla.client.session import InferenceSession
from corolla.models.registry import family_for


class DistributedModelMixin:
    """Mixed into a transformers *ForCausalLM / *ForSequenceClassification class by each family."""

    _keys_to_ignore_on_load_unexpected = [r"^model\.layers\.", r"^transformer\.h\."]
    _trainable_heads: tuple[str, ...] = ()  # modules that stay trainable when a tuning mode freezes the rest

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        client_config = ClientConfig.pop_from(kwargs)
        if "torch_dtype" in kwargs:  # Petals' and older transformers' spelling
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        kwargs.setdefault("local_files_only", True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.attach_swarm(client_config, model_id=os.path.basename(os.path.normpath(str(pretrained_model_name_or_path))))
        return model

    def attach_swarm(self, client_config: ClientConfig, model_id: str) -> None:
        """Bind the remote blocks to workers; done after loading so construction needs no network."""
        bus = BusLoop.get()
        pool = ConnectionPool(bus.context, Security.from_file(client_config.swarm_key))
        if client_config.routing == STATIC:  # the user's chain, in the user's order
            router = StaticRouter(client_config.initial_peers, pool, model_id, client_config.request_timeout)
        else:
            router = SwarmRouter.connect(client_config, model_id, self.remote_layers.num_blocks, bus)
        weakref.finalize(self, router.close_soon)  # discovery stops with the model
        self.client_config = client_config
        self.remote_layers.bind(client_config, router, pool, bus)
        if client_config.tuning_mode:
            self.requires_grad_(False)
            for name in self._trainable_heads:
                getattr(self, name).requires_grad_(True)
            self.base_model_for_blocks.init_prompts(client_config.tuning_mode, client_config.pre_seq_len)

    def save_trainable(self, path: str) -> None:
        """Save the parameters that train on the client (prompts, heads, local adapters) as safetensors."""
        save_file({k: v.detach().contiguous() for k, v in self.named_parameters() if v.requires_grad}, path)

    def load_trainable(self, path: str) -> None:
        state = load_file(path)
        unexpected = set(state) - {k for k, _ in self.named_parameters()}
        if unexpected:
            raise ValueError(f"{path} holds tensors this model lacks: {sorted(unexpected)[:3]}")
        self.load_state_dict(state, strict=False)

    @property
    def remote_layers(self) -> RemoteSequential:
        return self.base_model_for_blocks.layers

    @contextlib.contextmanager
    def inference_session(self, max_length: int):
        """Within this context, successive generate() calls continue one remote session.

        `max_length` counts the user's tokens; room for tuning prompts is added."""
        layers = self.remote_layers
        if layers.active_session is not None:
            raise RuntimeError("an inference session is already active on this model")
        with layers.inference_session(max_length + self.client_config.pre_seq_len) as session:
            layers.active_session = session
            try:
                yield session
            finally:
                layers.active_session = None

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs):
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if kwargs.get("num_beams", 1) > 1:
            raise NotImplementedError("beam search is not supported over the swarm; use greedy or sampling")
        session = session or self.remote_layers.active_session
        with contextlib.ExitStack() as stack:
            if session is None:
                length = self._session_length(inputs, kwargs) + self.client_config.pre_seq_len
                session = stack.enter_context(self.remote_layers.inference_session(length))
            if session.output_ids is not None:  # continue where the previous call stopped
                inputs = session.output_ids if inputs is None else torch.cat([session.output_ids, inputs], dim=1)
            kwargs.setdefault("past_key_values", RemotePastKeyValues(session))
            result = super().generate(inputs, *args, **kwargs)
            session.output_ids = result if isinstance(result, torch.Tensor) else result.sequences
            return result

    def _session_length(self, inputs: torch.Tensor | None, kwargs: dict) -> int:
        prompt = 0 if inputs is None else inputs.shape[1]
        if kwargs.get("max_new_tokens") is not None:
            return prompt + kwargs["max_new_tokens"]
        if kwargs.get("max_length") is not None:
            return kwargs["max_length"]
        config = kwargs.get("generation_config") or self.generation_config
        if config.max_new_tokens is not None:
            return prompt + config.max_new_tokens
        return max(config.max_length, prompt + 1)


class _AutoDistributed:
    """Picks the family's Distributed* class from the folder's config, as transformers' Auto classes do."""

    _task: str  # the Family attribute naming the class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, local_files_only=True)
        family = family_for(config)
        make = getattr(family, cls._task)
        if make is None:
            raise ValueError(f"family {family.name} has no {cls._task.replace('_', ' ')} client class")
        return make().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class AutoDistributedModelForCausalLM(_AutoDistributed):
    _task = "causal_lm"


class AutoDistributedModelForSequenceClassification(_AutoDistributed):
    _task = "sequence_classification"
