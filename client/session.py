"""An inference session: KV caches held by every worker of a chain, stepped token by token.

Each step sends only the new tokens' hidden states through the chain; the
workers keep the past in their caches under this session's id. The session
also keeps, per block boundary, the hidden states it has sent there: when a
worker fails, its blocks are routed anew (possibly split differently) and that
history is replayed to rebuild their caches, so generation goes on with the
same tokens.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import torch

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.errors import CorollaError
from corolla.bus.messages import CloseSession, OpenSession, Step
from corolla.client.config import ClientConfig
from corolla.client.faults import Bans, Retry, blame, failed_endpoint, reroute, retry_elsewhere, worth_retrying
from corolla.client.routing import Hop, Needs, Router

log = logging.getLogger(__name__)

PUSH_MIN_RTT_S = 0.002  # below this, pushing saves less latency than the extra concurrent requests cost


@dataclass
class _StepInputs:
    """What every hop of one step shares: masks, positions and (on the first step) deep prompts."""

    length: int
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    prompts: torch.Tensor | None


class InferenceSession:
    def __init__(self, router: Router, pool: ConnectionPool, bus: BusLoop, config: ClientConfig, num_blocks: int,
                 max_length: int, bans: Bans | None = None):
        self.router, self.pool, self.bus, self.config = router, pool, bus, config
        self.bans = bans or Bans()
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.position = 0  # tokens already in the workers' caches
        self.prefix_length = 0  # trainable prompt tokens at the front of the cache (ptune), unseen by generate()
        self.output_ids: torch.Tensor | None = None  # tokens of earlier generate() calls, for continuing
        self.batch_size: int | None = None
        self.recoveries = 0  # how many times a failed worker's blocks were rebuilt elsewhere
        self._hops: list[Hop] | None = None
        self._opened: dict[Hop, str] = {}  # hop -> its worker-side session id
        self._history: dict[int, list[torch.Tensor]] = {}  # block -> hidden states sent into it, step by step
        self._steps: list[_StepInputs] = []
        self._ids = itertools.count()
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def chain(self) -> list[tuple[str, int, int]]:
        """The workers serving this session now, as (endpoint, start, end) per hop; empty before the first step."""
        return [(hop.endpoint, hop.start, hop.end) for hop in self._hops or []]

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens' hidden states [batch, tokens, hidden] through all blocks; tokens may be 0."""
        if self.closed:
            raise CorollaError("this inference session is closed")
        if hidden.dim() != 3:
            raise ValueError(f"hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
        if self.batch_size is not None and hidden.shape[0] != self.batch_size:
            raise ValueError(f"session batch size is {self.batch_size}, got {hidden.shape[0]}")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session of max_length {self.max_length} cannot take {hidden.shape[1]} more tokens "
                             f"after {self.position}")
        inputs = _StepInputs(hidden.shape[1], attention_mask, position_ids, prompts)
        out = self.bus.run(self._step(hidden.detach(), inputs))
        self.position += hidden.shape[1]
        return out.to(hidden.device, hidden.dtype)  # the client may compute on a GPU

    async def _step(self, hidden: torch.Tensor, inputs: _StepInputs) -> torch.Tensor:
        self.batch_size = hidden.shape[0]
        if self._hops is None:
            self._hops = await reroute(self.router, self.bans, 0, self.num_blocks, self._needs)
        retry = Retry(self.config.max_retries)
        if len(self._hops) > 1 and self._push_pays():
            try:
                sent, out = await self._step_pushed(hidden, inputs)
                return self._record(sent, inputs, out)
            except Exception as e:
                if not worth_retrying(e):
                    raise
                log.info("session %s: pushed step failed (%s); relaying it through the client", self.session_id, e)
        sent: dict[int, torch.Tensor] = {}
        i = 0
        while i < len(self._hops):
            hop = self._hops[i]
            try:
                out = await self._send(hop, hidden, self.position, inputs)
            except Exception as e:
                if not worth_retrying(e):
                    raise
                await retry_elsewhere(e, hop, self.bans, self.router, retry)
                await self._replace(i)
                continue
            sent[hop.start] = hidden
            hidden, i = out, i + 1
        return self._record(sent, inputs, hidden)

    @property
    def _needs(self) -> Needs:
        return Needs(self.batch_size, self.max_length, self.config.active_adapter)

    def _push_pays(self) -> bool:
        if self.config.use_server_to_server is not None:
            return self.config.use_server_to_server
        rtts = [self.router.round_trip(hop.endpoint) for hop in self._hops]
        return any(rtt is not None and rtt >= PUSH_MIN_RTT_S for rtt in rtts)

    def _record(self, sent: dict[int, torch.Tensor], inputs: _StepInputs, out: torch.Tensor) -> torch.Tensor:
        if inputs.length:
            for block, h in sent.items():
                self._history.setdefault(block, []).append(h)
            self._steps.append(inputs)
        return out

    async def _step_pushed(self, hidden: torch.Tensor, inputs: _StepInputs):
        """Send the step to every hop at once: the first gets the hidden states, each pushes its output to the next.

        A failure anywhere bans the worker and raises; the caller then relays the step hop by hop (the hops that
        already computed it roll back to this position and compute it again)."""
        hops = list(self._hops)
        openings = [self._open_soon(hop) for hop in hops]
        requests = []
        for k, hop in enumerate(hops):
            nxt = hops[k + 1] if k + 1 < len(hops) else None
            prompts = None if inputs.prompts is None else inputs.prompts[hop.start:hop.end]
            step = Step(self._opened[hop], hidden if k == 0 else None, self.position, inputs.attention_mask,
                        inputs.position_ids, prompts, nxt.endpoint if nxt else "", self._opened[nxt] if nxt else "")
            # The reply and the push to the next worker share one codec; the client sees only its own links, so
            # the slower of its links to the two workers stands for the link between them.
            codec = await self.router.links.codec(self.config, hidden, hop.endpoint, *([nxt.endpoint] if nxt else []))
            requests.append(self._opened_then(hop, openings[k], self.pool.get(hop.endpoint).request(
                step, self.config.request_timeout, codec)))
        tasks = [asyncio.ensure_future(r) for r in requests]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for hop, task in zip(hops, tasks):
                if task.done() and task.exception() is not None:
                    error = task.exception()
                    if worth_retrying(error):
                        blame(self.bans, self.router, error, failed_endpoint(error, hop))
                    raise error
        finally:
            for task in tasks:  # downstream workers stop waiting for a push once the relayed step arrives
                task.cancel()
        outputs = [t.result().hidden for t in tasks]
        sent = {hop.start: (hidden if k == 0 else outputs[k - 1]) for k, hop in enumerate(hops)}
        return sent, outputs[-1]

    def _open_soon(self, hop: Hop) -> asyncio.Task | None:
        """Send OpenSession to a hop not open yet, without waiting for its answer: the step sent right behind it on
        the same connection finds the session, since a worker starts one connection's requests in the order they
        arrive and opens a session without waiting (bus/server.py, WorkerService.handle). So a new session's first
        step costs each hop one round trip, not two."""
        if hop in self._opened:
            return None
        hop_session = self._opened[hop] = f"{self.session_id}:{hop.start}:{next(self._ids)}"
        return asyncio.ensure_future(self.pool.get(hop.endpoint).request(
            OpenSession(hop_session, hop.start, hop.end, self.batch_size, self.max_length, self.config.active_adapter),
            self.config.request_timeout))

    async def _opened_then(self, hop: Hop, opening: asyncio.Task | None, request: Coroutine) -> Any:
        """The reply to `request`, sent to `hop` behind `opening`; the opening's error, if any, is the one raised
        (the request then failed only for want of the session), and the hop counts as not open. Cancelled while
        the opening is in flight (another hop of a pushed step failed), the hop stays open: its `open` has left,
        and closing the session must reach it."""
        if opening is None:  # every step after a hop's first: no task of its own on the hot path
            return await request
        reply = asyncio.ensure_future(request)  # sent now, behind the opening
        try:
            await opening
        except BaseException as e:
            if not reply.cancel() and not reply.cancelled():
                reply.exception()  # it failed for want of the session: retrieved, so asyncio does not report it
            if not isinstance(e, asyncio.CancelledError):
                self._opened.pop(hop, None)
            raise
        return await reply

    async def _send(self, hop: Hop, hidden: torch.Tensor, position: int, inputs: _StepInputs) -> torch.Tensor:
        opening = self._open_soon(hop)
        prompts = None if inputs.prompts is None else inputs.prompts[hop.start:hop.end]
        step = Step(self._opened[hop], hidden, position, inputs.attention_mask, inputs.position_ids, prompts)
        codec = await self.router.links.codec(self.config, hidden, hop.endpoint)
        reply = await self._opened_then(hop, opening, self.pool.get(hop.endpoint).request(
            step, self.config.request_timeout, codec))
        return reply.hidden

    async def _replace(self, i: int) -> None:
        """Route the failed hop's blocks anew and replay the session's history into the new workers."""
        failed = self._hops[i]
        self._opened.pop(failed, None)
        new_hops = await reroute(self.router, self.bans, failed.start, failed.end, self._needs)
        log.info("session %s: blocks %d:%d move from %s to %s", self.session_id, failed.start, failed.end,
                    failed.endpoint, [(h.endpoint, h.start, h.end) for h in new_hops])
        self._hops[i:i + 1] = new_hops
        self.recoveries += 1
        if not self._steps:
            return
        replay = self._replay_inputs()
        hidden = torch.cat(self._history[failed.start], dim=1)
        for hop in new_hops:
            self._history[hop.start] = [hidden]
            hidden = await self._send(hop, hidden, 0, replay)

    def _replay_inputs(self) -> _StepInputs:
        """All past steps as one: their masks and positions concatenated, the first step's deep prompts."""
        batch, position, masks, positions = self.batch_size, 0, [], []
        for s in self._steps:
            masks.append(s.attention_mask if s.attention_mask is not None else torch.ones(batch, s.length, dtype=torch.long))
            positions.append(s.position_ids if s.position_ids is not None
                             else torch.arange(position, position + s.length).expand(batch, -1))
            position += s.length
        any_mask = any(s.attention_mask is not None for s in self._steps)
        any_positions = any(s.position_ids is not None for s in self._steps)
        return _StepInputs(position, torch.cat(masks, dim=1) if any_mask else None,
                           torch.cat(positions, dim=1) if any_positions else None, self._steps[0].prompts)

    def close(self) -> None:
        """Free the session's caches on its workers. Returns at once, the closes travelling in the background (a
        reply over slow links no longer waits a round trip for them); this client's next request to a worker
        arrives after its close, on the same connection, and the bus waits for them at exit."""
        if self.closed:
            return
        self.closed = True
        if self._opened:
            self.bus.submit(self._close(dict(self._opened)))

    async def _close(self, opened: dict[Hop, str]) -> None:
        async def close(hop: Hop, hop_session: str) -> None:
            try:
                await self.pool.get(hop.endpoint).request(CloseSession(hop_session), 5.0)
            except Exception as e:  # the workers expire it anyway
                log.debug("closing session %s on %s: %s", hop_session, hop.endpoint, e)

        await asyncio.gather(*(close(hop, hop_session) for hop, hop_session in opened.items()))
