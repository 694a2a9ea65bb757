"""An inference session: KV caches held by every worker of a chain, stepped token by token.

Each step sends only the new tokens' hidden states through the chain; the
workers keep the past in their caches under this session's id. The worker
sessions open lazily on the first step, once the batch size is known.
"""
from __future__ import annotations

import logging
import uuid

import torch

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.messages import CloseSession, OpenSession, Step
from corolla.bus.errors import CorollaError
from corolla.client.config import ClientConfig
from corolla.client.routing import Hop, Router

log = logging.getLogger(__name__)


class InferenceSession:
    def __init__(self, router: Router, pool: ConnectionPool, bus: BusLoop, config: ClientConfig, num_blocks: int,
                 max_length: int):
        self.router, self.pool, self.bus, self.config = router, pool, bus, config
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens already in the workers' caches
        self.prefix_length = 0  # trainable prompt tokens at the front of the cache (ptune), unseen by generate()
        self.output_ids: torch.Tensor | None = None  # tokens of earlier generate() calls, for continuing
        self.batch_size: int | None = None
        self._hops: list[Hop] | None = None
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens' hidden states [batch, tokens, hidden] through all blocks; tokens may be 0."""
        if self.closed:
            raise CorollaError("this inference session is closed")
        if hidden.dim() != 3:
            raise ValueError(f"hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session of max_length {self.max_length} cannot take {hidden.shape[1]} more tokens "
                             f"after {self.position}")
        out = self.bus.run(self._step(hidden, attention_mask, position_ids, prompts))
        self.position += hidden.shape[1]
        return out.to(hidden.dtype)

    async def _step(self, hidden, attention_mask, position_ids, prompts) -> torch.Tensor:
        if self._hops is None:
            await self._open(hidden.shape[0])
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(f"session batch size is {self.batch_size}, got {hidden.shape[0]}")
        codec = self.config.activation_codec
        for hop in self._hops:
            hop_prompts = None if prompts is None else prompts[hop.start:hop.end]
            reply = await self.pool.get(hop.endpoint).request(
                Step(self._hop_session(hop), hidden, self.position, attention_mask, position_ids, hop_prompts),
                self.config.request_timeout, codec)
            hidden = reply.hidden
        return hidden

    async def _open(self, batch_size: int) -> None:
        hops = await self.router.chain(0, self.num_blocks)
        for hop in hops:
            await self.pool.get(hop.endpoint).request(
                OpenSession(self._hop_session(hop), hop.start, hop.end, batch_size, self.max_length,
                            self.config.active_adapter), self.config.request_timeout)
        self._hops, self.batch_size = hops, batch_size
        log.debug("session %s open on %s", self.session_id, [(h.endpoint, h.start, h.end) for h in hops])

    def _hop_session(self, hop: Hop) -> str:
        return f"{self.session_id}:{hop.start}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._hops:
            try:
                self.bus.run(self._close(), timeout=self.config.request_timeout)
            except Exception as e:  # the workers expire it anyway
                log.warning("closing session %s: %s", self.session_id, e)

    async def _close(self) -> None:
        for hop in self._hops:
            try:
                await self.pool.get(hop.endpoint).request(CloseSession(self._hop_session(hop)), 5.0)
            except CorollaError as e:
                log.debug("close on %s: %s", hop.endpoint, e)
