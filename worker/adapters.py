"""LoRA adapters served by a worker: PEFT-format folders, applied per request by name.

The adapters' layers are injected into the span with PEFT itself, every adapter
side by side; before each computation the compute thread activates the one the
request names (or none, for the base model). One compute thread means no two
requests ever see each other's choice.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from corolla.bus.errors import ErrorCode
from corolla.bus.server import RequestError

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder that cannot be served."""


class AdapterSet:
    def __init__(self, span: torch.nn.Module, block_prefix: str, adapters: dict[str, str]):
        self.span = span
        self.names = sorted(adapters)
        for name, folder in adapters.items():
            self._load(name, Path(folder).expanduser(), block_prefix)
        span.requires_grad_(False)
        self._layers = [m for m in span.modules() if isinstance(m, BaseTunerLayer)]
        self._active: str | None = None
        self.activate("")

    def _load(self, name: str, folder: Path, block_prefix: str) -> None:
        if not (folder / WEIGHTS).is_file() or not (folder / "adapter_config.json").is_file():
            raise AdapterError(f"adapter {name!r}: {folder} needs adapter_config.json and {WEIGHTS}")
        config = LoraConfig.from_pretrained(str(folder))
        state = {}
        for key, tensor in load_file(folder / WEIGHTS).items():
            local = self.span.checkpoint_key(key.removeprefix(PEFT_PREFIX), block_prefix)
            if local is not None:
                state[f"layers.{local[0]}.{local[1]}"] = tensor.to(next(self.span.parameters()).dtype)
        if not state:
            log.warning("adapter %s has no weights for this worker's blocks; it acts as the base model here", name)
            return
        inject_adapter_in_model(config, self.span, adapter_name=name, state_dict=state)
        result = set_peft_model_state_dict(self.span, state, adapter_name=name)
        if result.unexpected_keys:
            raise AdapterError(f"adapter {name!r}: weights for no layer: {result.unexpected_keys[:3]}")
        log.info("adapter %s: %d tensors from %s", name, len(state), folder)

    def check(self, name: str) -> None:
        if name and name not in self.names:
            raise RequestError(ErrorCode.UNKNOWN_ADAPTER,
                               f"no adapter {name!r} here; this worker serves {self.names or 'none'}")

    def activate(self, name: str) -> None:
        """Called on the compute thread right before running the span for a request."""
        if name == self._active:
            return
        for module in self._layers:
            if name and name in module.lora_A:
                module.enable_adapters(True)
                module.set_adapter(name)
            else:
                module.enable_adapters(False)
        self._active = name
