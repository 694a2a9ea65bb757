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
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.security import Security
from corolla.client.config import ClientConfig
from corolla.client.remote_cache import RemotePastKeyValues
from corolla.client.remote_sequential import RemoteSequential
from corolla.client.routing import STATIC, Router, StaticRouter, SwarmRouter
from corolla.client.session import InferenceSession
from corolla.models.registry import UnsupportedModelError, family_of_type


class DistributedModelMixin:
    """Mixed into a transformers *ForCausalLM / *ForSequenceClassification class by each family."""

    _keys_to_ignore_on_load_unexpected = [r"^model\.layers\.", r"^transformer\.h\."]
    _trainable_heads: tuple[str, ...] = ()  # modules that stay trainable when a tuning mode freezes the rest

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, _connecting: "_Connecting | None" = None,
                        **kwargs):
        connecting = _connecting or _Connecting.start(pretrained_model_name_or_path, kwargs)
        if "torch_dtype" in kwargs:  # Petals' and older transformers' spelling
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        kwargs.setdefault("local_files_only", True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except BaseException:
            connecting.router.close_soon()
            raise
        model.attach_swarm(connecting.client_config, connecting.model_id, (connecting.router, connecting.pool))
        return model

    def attach_swarm(self, client_config: ClientConfig, model_id: str,
                     swarm: tuple[Router, ConnectionPool] | None = None) -> None:
        """Bind the remote blocks to workers (to `swarm`, from connect_swarm, where given); done after loading, so
        construction needs no network."""
        router, pool = swarm or connect_swarm(client_config, model_id, self.remote_layers.num_blocks)
        weakref.finalize(self, router.close_soon)  # discovery stops with the model
        self.client_config = client_config
        self.remote_layers.bind(client_config, router, pool, BusLoop.get())
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


def connect_swarm(client_config: ClientConfig, model_id: str, num_blocks: int) -> tuple[Router, ConnectionPool]:
    """A router for the model's remote blocks and the pool of the steps' connections, with discovery, pings and
    connecting already under way in the background."""
    bus = BusLoop.get()
    pool = ConnectionPool(bus.context, Security.from_file(client_config.swarm_key))
    if client_config.routing == STATIC:  # the user's chain, in the user's order
        router = StaticRouter(client_config.initial_peers, pool, model_id, client_config.request_timeout)
        bus.loop.call_soon_threadsafe(router.measure)
    else:
        router = SwarmRouter.connect(client_config, model_id, num_blocks, bus, connections=pool)
    return router, pool


@dataclass(frozen=True)
class _Connecting:
    """A model's way to the swarm, under way before its local half loads: transformers' first import of a family's
    modules takes a second or two, and loading a large vocabulary's embeddings and head seconds, time that
    discovery, pings and connecting use instead of the first generate()."""

    client_config: ClientConfig
    model_id: str
    router: Router
    pool: ConnectionPool

    @classmethod
    def start(cls, path, kwargs: dict, fields: dict | None = None) -> "_Connecting":
        """Take the ClientConfig keywords out of from_pretrained's `kwargs` and start; `fields`: the folder's
        config.json, where the caller has read it already."""
        client_config = ClientConfig.pop_from(kwargs)
        config = kwargs.get("config")
        if isinstance(config, PretrainedConfig):
            num_blocks = config.num_hidden_layers
        else:
            fields = _config_dict(config) if config else fields or _config_dict(path)
            num_blocks = fields.get("num_hidden_layers")
            if num_blocks is None:
                family_of_type(fields.get("model_type"))  # an unsupported model says so
                raise UnsupportedModelError(f"the config of {path} does not say num_hidden_layers")
        model_id = os.path.basename(os.path.normpath(str(path)))
        return cls(client_config, model_id, *connect_swarm(client_config, model_id, num_blocks))


def _config_dict(path) -> dict:
    """A model folder's config.json as a dict: AutoConfig would first import the family's modules."""
    return PretrainedConfig.get_config_dict(str(path), local_files_only=True)[0]


class _AutoDistributed:
    """Picks the family's Distributed* class from the folder's config, as transformers' Auto classes do."""

    _task: str  # the Family attribute naming the class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        fields = _config_dict(pretrained_model_name_or_path)
        connecting = _Connecting.start(pretrained_model_name_or_path, kwargs, fields)  # before the family's modules
        try:
            family = family_of_type(fields.get("model_type"))
            make = getattr(family, cls._task)
            if make is None:
                raise ValueError(f"family {family.name} has no {cls._task.replace('_', ' ')} client class")
            model_class = make()
        except BaseException:
            connecting.router.close_soon()
            raise
        return model_class.from_pretrained(pretrained_model_name_or_path, *args, _connecting=connecting, **kwargs)


class AutoDistributedModelForCausalLM(_AutoDistributed):
    _task = "causal_lm"


class AutoDistributedModelForSequenceClassification(_AutoDistributed):
    _task = "sequence_classification"
