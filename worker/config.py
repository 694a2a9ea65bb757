"""A worker's settings: YAML file first, command-line flags over it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "int8", "nf4")  # weights of GPU workers, see worker/quantize.py


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
    # discovery (corolla.discovery) and block selection (worker/block_selection.py)
    initial_peers: list[str] = dataclasses.field(default_factory=list)  # any live peer's endpoint joins the swarm
    mdns: bool = True  # announce on the local link and browse it (bound to loopback: only with `interfaces`)
    interfaces: list[str] = dataclasses.field(default_factory=list)  # names or IPv4; default: see discovery/interfaces.py
    gossip_interval: float = 2.0  # seconds between gossip rounds; a silent peer expires after ~3 of them
    discovery_wait: float = 2.0  # with num_blocks alone: seconds to listen for the swarm before choosing blocks
    rebalance_interval: float = 60.0  # with num_blocks alone: seconds between checks whether to move (0: never)
    throughput: float | None = None  # inference tokens/s per block to announce; default: measured at start
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # LoRA name -> PEFT folder
    swarm_key: str | None = None  # file with the private swarm's secret (`corolla keygen`); None: public swarm
    push_timeout: float = 30.0  # how long a step waits for its input pushed by the previous worker
    max_queue: int = 256  # compute requests waiting at once; beyond it the worker answers BUSY
    # single-token steps of different sessions run as one pass, up to this many; 1: off. With cuda_graphs, also the
    # slots of the GPU's slot pool (worker/slots.py), which takes up to half of cache_tokens
    max_decode_batch: int = 16
    metrics_port: int = 0  # Prometheus metrics over HTTP on host:metrics_port; 0: off
    quantization: str = "none"  # none, int8 or nf4 (bitsandbytes, CUDA only; see worker/quantize.py)
    # nf4: one-token products on Corolla's kernel (worker/nf4_gemv.py); off: bitsandbytes' own, slower, whose
    # rounding transformers + bitsandbytes share, so greedy tokens follow theirs exactly
    nf4_kernel: bool = True
    random_weights: bool = False  # benchmarks only: random blocks built from config.json, no checkpoint read
    seed: int = 0  # seed of random_weights
    cuda_graphs: bool = True  # CUDA devices: single-token steps of batch-1 sessions replay a CUDA graph
    # with cuda_graphs: compile the graphed step first (fused kernels, ~10% more steps/s on GPU); off by default
    # because the compiled step's reductions round differently, so tokens can part from transformers' (70B shape);
    # turns the slot pool off, as its graphs serve one session each
    compile_decode: bool = False

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
        if isinstance(config.adapters, list):  # a list of folders: each named after its folder
            config.adapters = {Path(p).name: p for p in config.adapters}
        config.validate()
        return config

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.blocks is not None:
            self.span()
        for key in ("cache_tokens", "max_batch_size", "max_length", "max_message_bytes", "max_decode_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a positive integer")
        if not isinstance(self.adapters, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.adapters.items()):
            raise ConfigError("adapters must map names to PEFT folders (or be a list of folders)")
        if not isinstance(self.gossip_interval, (int, float)) or self.gossip_interval <= 0:
            raise ConfigError("gossip_interval must be a positive number of seconds")
        for key in ("discovery_wait", "rebalance_interval"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ConfigError(f"{key} must be a number of seconds, 0 or more")
        for key in ("mdns", "random_weights", "cuda_graphs", "compile_decode", "nf4_kernel"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, not {getattr(self, key)!r}")
        for key in ("initial_peers", "interfaces"):
            if not isinstance(getattr(self, key), list) or not all(isinstance(x, str) for x in getattr(self, key)):
                raise ConfigError(f"{key} must be a list of strings")
        if self.throughput is not None and (not isinstance(self.throughput, (int, float)) or self.throughput <= 0):
            raise ConfigError("throughput must be a positive number of tokens/s")
        for key in ("port", "metrics_port"):
            if not 0 <= int(getattr(self, key)) < 65536:
                raise ConfigError(f"{key} {getattr(self, key)} is out of range")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device must be a torch device such as cpu, cuda or cuda:1, not {self.device!r}"
                              ) from None
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.quantization != "none" and torch.device(self.device).type != "cuda":
            raise ConfigError(f"quantization {self.quantization!r} needs a CUDA device (bitsandbytes' kernels), "
                              f"this worker's device is {self.device!r}: use quantization: none")

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
