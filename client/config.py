"""How a client reaches and talks to the swarm (the keywords of `from_pretrained` that are not transformers')."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from corolla.bus.wire import Codec


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # worker endpoints, e.g. tcp://10.0.0.5:31337
    wire_dtype: torch.dtype | None = torch.float16  # how activations travel; None: as computed
    # "raw", "lz4" or "int8" for every activation; "auto": raw or int8 per message from the link's measured bandwidth
    # and the payload (compression/policy.py). Not the default: int8 changes greedy tokens
    # (perf/bench_codec_policy.py), and outputs should not depend on the network a user happens to be on.
    codec: str = "raw"
    request_timeout: float = 30.0
    # Workers push hidden states to the next worker instead of via the client. None (auto): push where a
    # measured round trip of the chain exceeds PUSH_MIN_RTT_S; on a fast LAN relaying costs less CPU.
    use_server_to_server: bool | None = None
    # Stateless forward/backward split the batch into micro-batches in flight along the chain at once, so all its
    # workers compute together. None (auto): from the batch size and the chain's hops; 1: off; n: at most n.
    micro_batches: int | None = None
    max_retries: int = 5  # attempts to route around failed workers before giving up
    ban_seconds: float = 30.0  # how long a failed worker is kept out of new chains
    swarm_key: str | None = None  # private swarm: file with the swarm secret (`corolla keygen`)
    active_adapter: str = ""
    tuning_mode: str | None = None  # None, "ptune" or "deep_ptune"
    pre_seq_len: int = 0
    # discovery and routing (see client/routing.py, corolla.discovery)
    allowed_servers: list[str] = field(default_factory=list)  # peer ids or endpoints; if any, route only via these
    blocked_servers: list[str] = field(default_factory=list)  # peer ids or endpoints never routed through
    routing: str = "latency"  # "latency": fastest chain per token; "throughput": spread requests over replicas;
    # "static": initial_peers are the chain, in order, each taking over where the previous one ends
    mdns: bool = True  # with no initial_peers, find workers by mDNS
    interfaces: list[str] = field(default_factory=list)  # mDNS interfaces (names or IPv4); default: non-loopback
    discovery_timeout: float = 10.0  # how long a chain waits for discovery to find blocks it lacks

    @classmethod
    def pop_from(cls, kwargs: dict) -> "ClientConfig":
        """Take this config's keywords out of a from_pretrained call, leaving transformers' own."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})

    @property
    def activation_codec(self) -> Codec:
        return Codec(self.codec, self.wire_dtype)
