"""A worker's settings: YAML file first, command-line flags over it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A worker configuration that cannot work; the message names the key."""


@dataclass
class WorkerConfig:
    model: str  # Hugging Face folder with config.json and safetensors
    blocks: str | None = None  # "start:end"
    num_blocks: int | None = None  # alternative to `blocks`: how many blocks to serve
    model_id: str | None = None  # name announced to the swarm; default: the folder's name
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    public_host: str | None = None  # address announced to peers, if not `host`
    cache_tokens: int = 32768  # KV-cache budget, in tokens summed over sessions (batch x max_length)
    max_batch_size: int = 64
    max_length: int = 8192  # longest session a client may open
    idle_timeout: float = 300.0  # seconds before an idle session is dropped
    max_message_bytes: int = 256 << 20
    threads: int | None = None  # torch intra-op threads; default: torch's choice

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "WorkerConfig":
        values: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"cannot read {path}: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of settings")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        if "model" not in values:
            raise ConfigError("no model folder given (key `model` or --model)")
        config = cls(**values)
        config.model = str(Path(config.model).expanduser())
        config.validate()
        return config

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.blocks is not None:
            self.span()
        for key in ("cache_tokens", "max_batch_size", "max_length", "max_message_bytes"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer")
        if not 0 <= int(self.port) < 65536:
            raise ConfigError(f"port {self.port} is out of range")

    def span(self) -> tuple[int, int] | None:
        if self.blocks is None:
            return None
        try:
            start, end = (int(x) for x in str(self.blocks).split(":"))
        except ValueError:
            raise ConfigError(f"blocks must look like start:end, not {self.blocks!r}") from None
        if not 0 <= start < end:
            raise ConfigError(f"blocks {self.blocks!r} is empty or negative")
        return start, end

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_overrides(self, **overrides: Any) -> "WorkerConfig":
        return dataclasses.replace(self, **overrides)
