"""The model's transformer blocks as one nn.Module whose computation happens on the workers.

It sits where the family keeps its blocks (`model.model.layers` for Llama), so
code that walks a transformers model finds it there. Stateless forward passes
go span by span; autograd flows back through the same spans with backward
requests, so local parameters (prompts, heads, adapters) receive exact gradients.

A large batch is split into micro-batches that travel the chain concurrently,
each its own sequence of hop requests, so worker k computes micro-batch i while
worker k+1 computes i-1 instead of idling; each one re-routes on its own when
a hop fails, so the others' finished work is kept.
"""
from __future__ import annotations

import asyncio

import torch
from torch import nn

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.messages import Backward, Forward
from corolla.client.config import ClientConfig
from corolla.client.faults import Bans, Retry, reroute, retry_elsewhere, worth_retrying
from corolla.client.routing import Hop, Needs, Router
from corolla.client.session import InferenceSession


#: About 4 micro-batches per hop keep the pipeline's fill and drain (hops - 1 idle slots) a small part of the pass
#: (GPipe's rule of thumb); more only add per-request costs.
MICRO_BATCHES_PER_HOP = 4
#: A micro-batch smaller than this does too little compute to hide a request's fixed costs (framing, a round trip).
MIN_MICRO_BATCH_TOKENS = 512


def micro_batch_count(option: int | None, batch: int, tokens_per_row: int, hops: int) -> int:
    """How many micro-batches a pass of `batch` rows over a chain of `hops` uses (ClientConfig.micro_batches)."""
    if option is not None:
        if option < 1:
            raise ValueError(f"micro_batches must be None (automatic) or at least 1, not {option}")
        return max(1, min(option, batch))
    if hops < 2:
        return 1
    return max(1, min(batch, MICRO_BATCHES_PER_HOP * hops, batch * tokens_per_row // MIN_MICRO_BATCH_TOKENS))


def row_slices(batch: int, n: int) -> list[slice]:
    """`n` contiguous runs of rows whose sizes differ by at most one."""
    bounds = [batch * i // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class RemoteSequential(nn.Module):
    def __init__(self, num_blocks: int):
        super().__init__()
        self.num_blocks = num_blocks
        self.client_config: ClientConfig | None = None
        self.router: Router | None = None
        self.pool: ConnectionPool | None = None
        self.bus: BusLoop | None = None
        self.active_session: InferenceSession | None = None

    def bind(self, config: ClientConfig, router: Router, pool: ConnectionPool, bus: BusLoop) -> None:
        self.client_config, self.router, self.pool, self.bus = config, router, pool, bus
        self.bans = Bans(config.ban_seconds)

    def __len__(self) -> int:
        return self.num_blocks

    def extra_repr(self) -> str:
        return f"blocks=0..{self.num_blocks}, remote"

    @property
    def _needs(self) -> Needs:
        """Stateless passes need only their workers to serve the active adapter."""
        return Needs(adapter=self.client_config.active_adapter)

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self.router, self.pool, self.bus, self.client_config, self.num_blocks, max_length,
                                self.bans)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return _RemoteForward.apply(self, hidden, attention_mask, position_ids, prompts)

    async def _call(self, hop: Hop, message, retry: Retry):
        """One request to one hop; a failure bans the worker and raises for the caller to re-route."""
        try:
            codec = await self.router.links.codec(self.client_config, message.hidden, hop.endpoint)
            return await self.pool.get(hop.endpoint).request(message, self.client_config.request_timeout, codec)
        except Exception as e:
            if not worth_retrying(e):
                raise
            await retry_elsewhere(e, hop, self.bans, self.router, retry)
            raise _Reroute() from e

    async def _forward_range(self, start: int, end: int, hidden, attention_mask, position_ids, prompts,
                             retry: Retry, hops: list[Hop] | None = None
                             ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Outputs of blocks [start, end), and each hop with the input it saw (kept for backward); `hops`: a chain
        already routed for them."""
        saved = []
        if hops is None:
            hops = await reroute(self.router, self.bans, start, end, self._needs)
        while hops:
            hop = hops[0]
            hop_prompts = None if prompts is None else prompts[hop.start:hop.end]
            try:
                reply = await self._call(hop, Forward(hidden, hop.start, hop.end, attention_mask, position_ids,
                                                      hop_prompts, self.client_config.active_adapter), retry)
            except _Reroute:
                hops = await reroute(self.router, self.bans, hop.start, end, self._needs)
                continue
            saved.append((hop, hidden))
            hidden, hops = reply.hidden, hops[1:]
        return hidden, saved

    async def _backward_hops(self, saved: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor, attention_mask,
                             position_ids, prompts, prompt_grads: torch.Tensor | None, retry: Retry) -> torch.Tensor:
        """Gradient with respect to the first hop's input; a failed hop's blocks are re-routed and recomputed."""
        for hop, hidden in reversed(saved):
            hop_prompts = None if prompts is None else prompts[hop.start:hop.end]
            try:
                reply = await self._call(hop, Backward(hidden, grad, hop.start, hop.end, attention_mask, position_ids,
                                                       hop_prompts, self.client_config.active_adapter), retry)
            except _Reroute:
                _, resaved = await self._forward_range(hop.start, hop.end, hidden, attention_mask, position_ids,
                                                       prompts, retry)
                grad = await self._backward_hops(resaved, grad, attention_mask, position_ids, prompts, prompt_grads,
                                                 retry)
                continue
            grad = reply.grad_hidden
            if prompt_grads is not None and reply.grad_prompts is not None:
                prompt_grads[hop.start:hop.end] = reply.grad_prompts.to(prompt_grads.dtype)
        return grad

    async def _forward_pipelined(self, hidden, attention_mask, position_ids, prompts
                                 ) -> tuple[torch.Tensor, list[slice], list[list[tuple[Hop, torch.Tensor]]]]:
        """All blocks' outputs, computed in micro-batches along one chain; their rows and saved inputs for backward."""
        hops = await reroute(self.router, self.bans, 0, self.num_blocks, self._needs)
        rows = row_slices(hidden.shape[0], micro_batch_count(self.client_config.micro_batches, hidden.shape[0],
                                                             hidden.shape[1], len(hops)))
        done = await _all(self._forward_range(0, self.num_blocks, hidden[r], _rows(attention_mask, r),
                                              _rows(position_ids, r), _prompt_rows(prompts, r),
                                              Retry(self.client_config.max_retries), hops) for r in rows)
        return torch.cat([out for out, _ in done]), rows, [saved for _, saved in done]

    async def _backward_pipelined(self, rows: list[slice], saved: list[list[tuple[Hop, torch.Tensor]]], grad,
                                  attention_mask, position_ids, prompts
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients for the input and the prompts, micro-batch by micro-batch as the forward split them."""
        prompt_grads = [None if prompts is None else torch.zeros_like(_prompt_rows(prompts, r)) for r in rows]
        grads = await _all(self._backward_hops(s, grad[r], _rows(attention_mask, r), _rows(position_ids, r),
                                               _prompt_rows(prompts, r), g, Retry(self.client_config.max_retries))
                           for r, s, g in zip(rows, saved, prompt_grads))
        if prompts is None:
            return torch.cat(grads), None
        shared = prompts.shape[1] == 1  # one prompt for every row: its gradient is the sum over rows
        return torch.cat(grads), sum(prompt_grads) if shared else torch.cat(prompt_grads, dim=1)


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _prompt_rows(prompts: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Deep prompts [blocks, batch or 1, prefix, hidden] for these rows; one shared by the batch stays whole."""
    return prompts if prompts is None or prompts.shape[1] == 1 else prompts[:, rows]


async def _all(coros) -> list:
    """Results in order; the first failure cancels the rest, whose work is useless without it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


class _Reroute(Exception):
    """A hop failed and was banned; route its blocks again."""


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module: RemoteSequential, hidden, attention_mask, position_ids, prompts):
        prompts = None if prompts is None else prompts.detach()
        out, rows, saved = module.bus.run(module._forward_pipelined(hidden.detach(), attention_mask, position_ids,
                                                                    prompts))
        ctx.module, ctx.rows, ctx.saved = module, rows, saved
        ctx.aux = (attention_mask, position_ids, prompts)
        ctx.device, ctx.dtype = hidden.device, hidden.dtype
        return out.to(hidden.device, hidden.dtype)  # the client may compute on a GPU

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_prompts = ctx.module.bus.run(ctx.module._backward_pipelined(
            ctx.rows, ctx.saved, grad_out.contiguous(), *ctx.aux))
        return None, grad_hidden.to(ctx.device, ctx.dtype), None, None, grad_prompts
