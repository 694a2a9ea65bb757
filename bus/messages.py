"""The message kinds that travel between clients and workers.

Each kind is a small dataclass registered under a short name. Fields annotated
`Tensor` or `Tensor | None` travel as frames after the header (see wire.py);
every other field travels in the msgpack header body and is type-checked on
arrival, so a handler only ever sees well-typed messages.
"""
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

REGISTRY: dict[str, type] = {}


def message(kind: str):
    """Register a dataclass as a message kind."""

    def wrap(cls):
        cls = dataclass(cls)
        cls.KIND = kind
        REGISTRY[kind] = cls
        return cls

    return wrap


# ---- requests -------------------------------------------------------------------------


@message("ping")
class Ping:
    """Round-trip probe; also answered by an idle worker under load, so it measures the link."""


@message("probe")
class Probe:
    """Link measurement: the worker echoes `data` (random bytes lz4 cannot shrink); timed against a Ping, the echo
    gives the link's bandwidth (client/routing.py, LinkMeter)."""

    data: Tensor  # uint8


@message("info")
class InfoRequest:
    """Ask a worker what it serves."""


@message("forward")
class Forward:
    """Stateless pass of whole sequences through blocks [start, end) of the worker's span."""

    hidden: Tensor  # [batch, seq, hidden]
    start: int
    end: int
    attention_mask: Tensor | None = None  # [batch, seq], 1 = real token, 0 = padding
    position_ids: Tensor | None = None  # [batch, seq]
    prompts: Tensor | None = None  # deep prompt tuning: [end-start, batch, pre_seq_len, hidden]
    adapter: str = ""


@message("backward")
class Backward:
    """Gradient of a stateless forward: given the inputs and d(loss)/d(outputs), return d/d(inputs)."""

    hidden: Tensor
    grad_output: Tensor
    start: int
    end: int
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None
    prompts: Tensor | None = None
    adapter: str = ""


@message("open")
class OpenSession:
    """Reserve KV cache for an inference session over blocks [start, end)."""

    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    adapter: str = ""


@message("step")
class Step:
    """Append `hidden` at cache position `position` (earlier positions roll the cache back) and return the span's output."""

    session_id: str
    hidden: Tensor | None  # [batch, new_tokens, hidden]; new_tokens may be 0; None: pushed by the previous worker
    position: int
    attention_mask: Tensor | None = None  # [batch, new_tokens] for the new tokens only
    position_ids: Tensor | None = None  # [batch, new_tokens]
    prompts: Tensor | None = None
    push_to: str = ""  # server-to-server: also push the output to this worker ...
    push_session: str = ""  # ... as the input of its step in this session


@message("push")
class Push:
    """Worker to worker: the output of a step, the input of the next worker's step at the same position."""

    session_id: str
    position: int
    hidden: Tensor


@message("close")
class CloseSession:
    session_id: str


# ---- replies --------------------------------------------------------------------------


@message("pong")
class Pong:
    pass


@message("probe_echo")
class ProbeEcho:
    data: Tensor


@message("ok")
class Ack:
    pass


@message("hidden")
class HiddenReply:
    hidden: Tensor


@message("grads")
class GradsReply:
    grad_hidden: Tensor
    grad_prompts: Tensor | None = None


@message("worker_info")
class WorkerInfo:
    peer_id: str
    model: str
    start: int
    end: int
    num_blocks: int  # blocks in the whole model
    dtype: str
    version: int
    cache_tokens_free: int
    cache_tokens_total: int
    throughput: float = 0.0  # tokens/s one block can process, a routing estimate
    adapters: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@message("error")
class ErrorReply:
    code: str
    message: str



# ---- discovery: gossip (see discovery/gossip.py) ----------------------------------------


@message("gossip_digest")
class GossipDigest:
    """Push-pull gossip, step 1: what the sender knows, one packed record (peer key, version, heartbeat,
    heartbeat age in ms) per peer, as a uint8 tensor: a 10,000-peer digest is 200 kB and compares in
    microseconds. No digest gets the whole table back: that is how a client pulls it."""

    digest: Tensor | None = None


@message("gossip_entries")
class GossipEntries:
    """Push-pull gossip, step 2 (the answer to a digest) and step 3 (the push of what was wanted): full
    entries the other side lacks or holds at an older version, newer heartbeats of entries it holds (packed
    like a digest), and the packed 8-byte keys of the peers whose full entries this side wants."""

    entries: list[dict] = field(default_factory=list)
    beats: Tensor | None = None
    want: Tensor | None = None
