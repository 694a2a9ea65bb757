"""What a worker does with each request: validate it against the span, then compute.

Runs on the worker's event loop; the tensor work itself goes to the priority
compute thread. Every check that can fail raises RequestError with a stable
code, before any state changes, so a bad request leaves sessions untouched.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import torch
import zmq.asyncio

from corolla.bus import wire
from corolla.bus.errors import ErrorCode
from corolla.bus.client import ConnectionPool
from corolla.bus.messages import (Ack, Backward, CloseSession, Forward, GradsReply, HiddenReply, InfoRequest,
                                  OpenSession, Ping, Pong, Probe, ProbeEcho, Push, Step, WorkerInfo)
from corolla.bus.security import Security
from corolla.bus.server import RequestError
from corolla.worker.adapters import AdapterSet
from corolla.worker.batching import Row, groups, joinable, step_together
from corolla.worker.compute import PRIORITY_FORWARD, PRIORITY_INFERENCE, PRIORITY_TRAINING, PriorityExecutor
from corolla.worker.config import WorkerConfig
from corolla.worker.cuda_graph import GraphDecoder, graphable, make_current
from corolla.worker.kv_cache import Session, SessionTable
from corolla.worker.push import Mailbox, Pusher
from corolla.worker.slots import SlotPool, SlotRow, slot_length, span_step

log = logging.getLogger(__name__)


class WorkerService:
    def __init__(self, span: torch.nn.Module, config: WorkerConfig, model_id: str, num_blocks: int, start: int,
                 end: int, hidden_size: int, adapters: AdapterSet | None = None, security: Security | None = None):
        self.span = span
        self.config = config
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.start, self.end = start, end
        self.hidden_size = hidden_size
        self.dtype = config.torch_dtype
        self.device = torch.device(config.device)
        self.peer_id = uuid.uuid4().hex[:16]
        self.adapters = adapters
        self.compute = PriorityExecutor(max_queue=config.max_queue, max_batch=config.max_decode_batch,
                                        initializer=lambda: make_current(self.device))
        self.batched_steps = 0  # steps that ran in one pass with other sessions' steps
        self.decode_batches = 0  # such passes
        self.graphs = (GraphDecoder(span, start, end, hidden_size, self.dtype, self.device, config.compile_decode)
                       if self.device.type == "cuda" and config.cuda_graphs and adapters is None else None)
        self.pool = self._slot_pool() if self.graphs else None
        self.sessions = SessionTable(config.cache_tokens, config.idle_timeout, self.pool)
        self.started = time.time()
        self._extra: dict[type, Callable[[Any], Awaitable[Any]]] = {}
        self.security = security
        self.mailbox = Mailbox()
        self._pusher: Pusher | None = None  # made on first use, on the worker's event loop

    def add_handler(self, kind: type, handler: Callable[[Any], Awaitable[Any]]) -> None:
        """Serve another message kind on this worker's socket (discovery's gossip, for one)."""
        self._extra[kind] = handler

    async def handle(self, envelope: wire.Envelope):
        msg = envelope.message
        if isinstance(msg, Ping):
            return Pong()
        if isinstance(msg, Probe):  # clients time the echo to choose how activations travel here
            return ProbeEcho(msg.data)
        if isinstance(msg, InfoRequest):
            return self.info()
        if isinstance(msg, Step):
            session = self.sessions.get(msg.session_id)
            if msg.hidden is None:
                msg.hidden = await self.mailbox.receive(msg.session_id, msg.position, self.config.push_timeout)
            else:
                self.mailbox.supersede(msg.session_id, msg.position)
            out = await self.compute.submit_batched(PRIORITY_INFERENCE, self._steps, (session, msg),
                                                    self._batch_key(session, msg), session.session_id)
            if msg.push_to:
                self._push(msg, out, envelope.reply_codec)
            return HiddenReply(out)
        if isinstance(msg, Push):
            self.sessions.get(msg.session_id)  # only pushes into this worker's open sessions are held
            self.mailbox.deliver(msg.session_id, msg.position, msg.hidden)
            return Ack()
        if isinstance(msg, OpenSession):
            return self._open(msg)
        if isinstance(msg, CloseSession):
            self.sessions.close(msg.session_id)
            return Ack()
        if isinstance(msg, Forward):
            self._check_request_span(msg.start, msg.end)
            self._check_adapter(msg.adapter)
            return HiddenReply(await self.compute.submit(PRIORITY_FORWARD, self._forward, msg))
        if isinstance(msg, Backward):
            self._check_request_span(msg.start, msg.end)
            self._check_adapter(msg.adapter)
            grads = await self.compute.submit(PRIORITY_TRAINING, self._backward, msg)
            return GradsReply(*grads)
        extra = self._extra.get(type(msg))
        if extra is not None:
            return await extra(msg)
        raise RequestError(ErrorCode.UNKNOWN_KIND, f"a worker does not serve {type(msg).KIND!r} requests")

    @property
    def pusher(self) -> Pusher:
        """On the worker's event loop only."""
        if self._pusher is None:
            self._pusher = Pusher(ConnectionPool(zmq.asyncio.Context.instance(), self.security))
        return self._pusher

    def _push(self, msg: Step, out: torch.Tensor, codec: wire.Codec) -> None:
        self.pusher.push(msg.push_to, msg.push_session, msg.position, out, codec)

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters this worker serves (what its info and its gossip entry announce)."""
        return self.adapters.names if self.adapters else []

    def info(self) -> WorkerInfo:
        return WorkerInfo(peer_id=self.peer_id, model=self.model_id, start=self.start, end=self.end,
                          num_blocks=self.num_blocks, dtype=self.config.dtype, version=wire.PROTOCOL_VERSION,
                          cache_tokens_free=self.sessions.free_tokens, cache_tokens_total=self.sessions.budget_tokens,
                          adapters=self.adapter_names,
                          extra={"pushes_received": self.mailbox.delivered,
                                 "push_peers_connected": self._pusher.connected if self._pusher else 0,
                                 "push_peers_held": len(self._pusher.pool) if self._pusher else 0,
                                 "batched_steps": self.batched_steps,
                                 "decode_batches": self.decode_batches,
                                 "slots": self.pool.slots if self.pool else 0,
                                 "slot_length": self.pool.length if self.pool else 0})

    def _slot_pool(self) -> SlotPool | None:
        """The pool whose batch-1 sessions' decode steps share CUDA graphs (worker/slots.py). Not with a compiled
        step (its graphs serve one session each), sliding-window attention (a pool pass attends to every slot) or
        int8 weights (bitsandbytes' int8 product of several rows finds its outliers on the host: no graph)."""
        config = getattr(self.span, "span_config", None)
        slots = self.config.max_decode_batch
        length = slot_length(self.config.max_length, self.config.cache_tokens, slots)
        if config is None or self.config.compile_decode or slots < 2 or not length \
                or getattr(config, "sliding_window", None) or self.config.quantization == "int8":
            return None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return SlotPool(span_step(self.span), len(self.span.layers), slots, length, config.num_key_value_heads,
                        head_dim, self.hidden_size, self.dtype, self.device, self.graphs.shared_pool)

    # ---- validation, on the event loop ---------------------------------------------------

    def _check_request_span(self, start: int, end: int) -> None:
        if not self.start <= start < end <= self.end:
            raise RequestError(ErrorCode.WRONG_BLOCKS,
                               f"blocks {start}:{end} requested, this worker holds {self.start}:{self.end}")

    def _open(self, msg: OpenSession) -> Ack:
        self._check_request_span(msg.start, msg.end)
        if not 0 < msg.batch_size <= self.config.max_batch_size:
            raise RequestError(ErrorCode.BAD_REQUEST, f"batch size {msg.batch_size} not in 1..{self.config.max_batch_size}")
        if not 0 < msg.max_length <= self.config.max_length:
            raise RequestError(ErrorCode.BAD_REQUEST, f"max length {msg.max_length} not in 1..{self.config.max_length}")
        self._check_adapter(msg.adapter)
        if not msg.session_id or len(msg.session_id) > 128:
            raise RequestError(ErrorCode.BAD_REQUEST, "session id must be 1..128 characters")
        self.sessions.expire()  # their slots first
        cache = self._pooled_cache(msg)
        if cache is None:
            cache = (self.graphs.new_cache(msg.batch_size, msg.start, msg.end, msg.adapter, msg.max_length)
                     if self.graphs else self.span.new_cache())
        session = Session(msg.session_id, msg.start, msg.end, msg.batch_size, msg.max_length, cache, msg.adapter)
        try:
            self.sessions.open(session)
        except RequestError:
            session.release()
            raise
        return Ack()

    def _pooled_cache(self, msg: OpenSession):
        """A slot of the pool for a batch-1 session of the whole span that fits one, if any is free."""
        if self.pool is None or msg.max_length > self.pool.length \
                or not graphable(msg.batch_size, msg.adapter, (msg.start, msg.end), (self.start, self.end)):
            return None
        return self.pool.acquire()

    def _check_adapter(self, name: str) -> None:
        if self.adapters is not None:
            self.adapters.check(name)
        elif name:
            raise RequestError(ErrorCode.UNKNOWN_ADAPTER, f"this worker serves no adapters, asked for {name!r}")

    def _check_hidden(self, hidden: torch.Tensor, batch: int | None = None) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise RequestError(ErrorCode.BAD_SHAPE,
                               f"hidden states must be [batch, tokens, {self.hidden_size}], got {list(hidden.shape)}")
        if not hidden.is_floating_point():
            raise RequestError(ErrorCode.BAD_SHAPE, f"hidden states must be floating point, got {hidden.dtype}")
        if hidden.shape[0] == 0:
            raise RequestError(ErrorCode.BAD_SHAPE, "an empty batch")
        if batch is not None and hidden.shape[0] != batch:
            raise RequestError(ErrorCode.BAD_SHAPE, f"session batch size is {batch}, got {hidden.shape[0]}")
        if hidden.shape[0] > self.config.max_batch_size:
            raise RequestError(ErrorCode.BAD_SHAPE, f"batch {hidden.shape[0]} over the limit {self.config.max_batch_size}")
        if not torch.isfinite(hidden).all():
            raise RequestError(ErrorCode.BAD_VALUE, "hidden states contain NaN or Inf")

    def _check_aux(self, name: str, t: torch.Tensor | None, shape: tuple[int, int]) -> None:
        if t is None:
            return
        if tuple(t.shape) != shape or t.is_floating_point():
            raise RequestError(ErrorCode.BAD_SHAPE, f"{name} must be an integer tensor of shape {list(shape)}, "
                                                    f"got {t.dtype} {list(t.shape)}")

    def _check_prompts(self, prompts: torch.Tensor | None, n_blocks: int, batch: int) -> None:
        if prompts is None:
            return
        if prompts.dim() != 4 or prompts.shape[0] != n_blocks or prompts.shape[1] not in (1, batch) \
                or prompts.shape[3] != self.hidden_size or not prompts.is_floating_point():
            raise RequestError(ErrorCode.BAD_SHAPE, f"prompts must be [{n_blocks}, batch, prefix, {self.hidden_size}]")

    def _check_stateless(self, msg: Forward | Backward) -> None:
        self._check_hidden(msg.hidden)
        b, t = msg.hidden.shape[:2]
        if t == 0:
            raise RequestError(ErrorCode.BAD_SHAPE, "a forward pass needs at least one token")
        if t > self.config.max_length:
            raise RequestError(ErrorCode.OUT_OF_RANGE, f"{t} tokens exceed the worker's max length {self.config.max_length}")
        self._check_extras(msg.hidden, msg.attention_mask, msg.position_ids, msg.prompts, msg.end - msg.start,
                           self.config.max_length)

    def _check_extras(self, hidden: torch.Tensor, attention_mask, position_ids, prompts, n_blocks: int,
                      max_length: int) -> None:
        """What travels beside checked hidden states: masks and positions of their shape, prompts for the blocks."""
        b, t = hidden.shape[:2]
        self._check_aux("attention_mask", attention_mask, (b, t))
        self._check_aux("position_ids", position_ids, (b, t))
        self._check_prompts(prompts, n_blocks, b)
        if position_ids is not None and position_ids.numel() \
                and (position_ids.min() < 0 or position_ids.max() >= max_length):
            raise RequestError(ErrorCode.OUT_OF_RANGE, "position ids out of range")

    # ---- compute, on the compute thread ----------------------------------------------------

    def _to_device(self, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device, dtype or t.dtype)

    def _run(self, hidden, mask, position_ids, cache, prompts, start, end, adapter):
        if self.adapters is not None:
            self.adapters.activate(adapter)
        return self.span(self._to_device(hidden, self.dtype), attention_mask=self._to_device(mask),
                         position_ids=self._to_device(position_ids), cache=cache,
                         prompts=self._to_device(prompts, self.dtype), first=start - self.start,
                         last=end - self.start)

    def _batch_key(self, session: Session, msg: Step) -> tuple | None:
        """Steps of one key may run as one pass (worker/batching.py); None: this step runs alone."""
        if msg.hidden.dim() != 3 or msg.hidden.shape[1] != 1 or msg.prompts is not None:
            return None
        if session.pooled:
            return "slots"
        if not joinable(session.cache):
            return None
        return session.start, session.end, session.adapter

    def _steps(self, items: list[tuple[Session, Step]]) -> list[tuple[torch.Tensor | None, Exception | None]]:
        """Steps taken off the queue together: each is checked on its own, those that pass run as one pass (one by
        one if that pass fails, so no session is left half-stepped)."""
        outcomes: list[tuple[torch.Tensor | None, Exception | None] | None] = [None] * len(items)
        rows: dict[int, Row] = {}
        for i, (session, msg) in enumerate(items):
            try:
                rows[i] = Row(session, msg.hidden, self._admit(session, msg), msg.position_ids)
            except Exception as e:
                outcomes[i] = (None, e)
        index = {id(row): i for i, row in rows.items()}
        for together in self._passes(list(rows.values())) if len(rows) > 1 else []:
            if len(together) < 2:
                continue
            try:
                for row, out in zip(together, self._step_together(together)):
                    outcomes[index[id(row)]] = (out, None)
            except Exception as e:
                log.warning("a batched decode pass failed (%s: %s); stepping its sessions one by one",
                            type(e).__name__, e)
        for i, row in rows.items():
            if outcomes[i] is None:
                try:
                    outcomes[i] = (self._compute_step(row.session, items[i][1], row.mask), None)
                except Exception as e:
                    outcomes[i] = (None, e)
        return outcomes

    def _passes(self, rows: list[Row]) -> list[list[Row]]:
        """Pooled sessions' rows as one pass (those with padding step alone); others as worker/batching.py groups."""
        if rows[0].session.pooled:
            return [[row for row in rows if row.mask is None]]
        return groups(rows)

    def _step_together(self, rows: list[Row]) -> list[torch.Tensor]:
        first = rows[0].session

        def run(hidden, mask, position_ids, cache):
            return self._run(hidden, mask, position_ids, cache, None, first.start, first.end, first.adapter)

        with torch.inference_mode():
            outs = (self.pool.run([_slot_row(row.session, row.hidden, row.position_ids) for row in rows])
                    if first.pooled else step_together(rows, self.span.new_cache(), run))
        for row in rows:
            row.session.mask = row.mask
            row.session.position += 1
        self.batched_steps += len(rows)
        self.decode_batches += 1
        return outs

    def _admit(self, session: Session, msg: Step) -> torch.Tensor | None:
        """Check a step and roll the session back to its position; the session's mask once the step is in."""
        hidden = msg.hidden
        self._check_hidden(hidden, session.batch_size)
        b, t = hidden.shape[:2]
        self._check_extras(hidden, msg.attention_mask, msg.position_ids, msg.prompts, session.end - session.start,
                           session.max_length)
        if not 0 <= msg.position <= session.position:
            raise RequestError(ErrorCode.OUT_OF_RANGE,
                               f"step at position {msg.position}, the session holds {session.position} tokens")
        if msg.position + t > session.max_length:
            raise RequestError(ErrorCode.OUT_OF_RANGE,
                               f"{msg.position + t} tokens exceed the session's max length {session.max_length}")
        if msg.position < session.position:  # a client re-sends from an earlier point: roll the cache back
            session.cache.crop(msg.position - session.position)  # a negative count: tokens to drop from the end
            session.position = msg.position
            if session.mask is not None:
                session.mask = session.mask[:, :msg.position]
        return _extend_mask(session.mask, msg.attention_mask, b, session.position, t)

    def _compute_step(self, session: Session, msg: Step, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = msg.hidden
        b, t = hidden.shape[:2]
        if t == 0:
            return hidden.new_zeros((b, 0, self.hidden_size))
        with torch.inference_mode():
            out = None
            if session.pooled:
                if mask is None and msg.prompts is None and (b, t) == (1, 1):
                    out = self.pool.run([_slot_row(session, hidden, msg.position_ids)])[0]
                else:
                    session.cache.at(session.position)
            elif self.graphs and mask is None and msg.prompts is None:
                out = self.graphs.step(session.cache, session.position, hidden, msg.position_ids)
            if out is None:
                out = self._run(hidden, mask, msg.position_ids, session.cache, msg.prompts, session.start,
                                session.end, session.adapter)
        session.mask = mask
        session.position += t
        return out

    def _forward(self, msg: Forward) -> torch.Tensor:
        self._check_stateless(msg)
        with torch.inference_mode():
            return self._run(msg.hidden, msg.attention_mask, msg.position_ids, None, msg.prompts, msg.start, msg.end,
                             msg.adapter)

    def _backward(self, msg: Backward) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_stateless(msg)
        if msg.grad_output.shape != msg.hidden.shape:
            raise RequestError(ErrorCode.BAD_SHAPE, f"grad_output must match hidden {list(msg.hidden.shape)}")
        hidden = self._to_device(msg.hidden, self.dtype).requires_grad_(True)
        prompts = self._to_device(msg.prompts, self.dtype)
        if prompts is not None:
            prompts.requires_grad_(True)
        with torch.enable_grad():
            out = self._run(hidden, msg.attention_mask, msg.position_ids, None, prompts, msg.start, msg.end,
                            msg.adapter)
            inputs = [hidden] if prompts is None else [hidden, prompts]
            grads = torch.autograd.grad(out, inputs, self._to_device(msg.grad_output, out.dtype))
        return grads[0], (grads[1] if prompts is not None else None)

    def close(self) -> None:
        self.compute.shutdown()


def _slot_row(session: Session, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> SlotRow:
    return SlotRow(session.cache.slot, session.position, hidden, position_ids)


def _extend_mask(past: torch.Tensor | None, new: torch.Tensor | None, batch: int, position: int, t: int):
    """The session's 2D mask after appending `t` tokens; None while every token so far is real."""
    if new is None and past is None:
        return None
    if new is not None and past is None and bool(new.all()):
        return None
    past = torch.ones(batch, position, dtype=torch.long) if past is None else past
    new = torch.ones(batch, t, dtype=torch.long) if new is None else new.long()
    return torch.cat([past, new], dim=1)
