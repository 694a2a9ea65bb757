"""The model's transformer blocks as one nn.Module whose computation happens on the workers.

It sits where the family keeps its blocks (`model.model.layers` for Llama), so
code that walks a transformers model finds it there. Stateless forward passes
go span by span; autograd flows back through the same spans with backward
requests, so local parameters (prompts, heads, adapters) receive exact gradients.
"""
from __future__ import annotations

import torch
from torch import nn

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.messages import Backward, Forward
from corolla.client.config import ClientConfig
from corolla.client.faults import Bans, Retry, failed_endpoint, reroute, worth_retrying
from corolla.client.routing import Hop, Router
from corolla.client.session import InferenceSession


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

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self.router, self.pool, self.bus, self.client_config, self.num_blocks, max_length,
                                self.bans)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return _RemoteForward.apply(self, hidden, attention_mask, position_ids, prompts)

    async def _call(self, hop: Hop, message, retry: Retry):
        """One request to one hop; a failure bans the worker and raises for the caller to re-route."""
        try:
            return await self.pool.get(hop.endpoint).request(message, self.client_config.request_timeout,
                                                             self.client_config.activation_codec)
        except Exception as e:
            if not worth_retrying(e):
                raise
            await retry.next(e)
            self.bans.ban_after(e, failed_endpoint(e, hop))
            raise _Reroute() from e

    async def _forward_range(self, start: int, end: int, hidden, attention_mask, position_ids, prompts,
                             retry: Retry) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Outputs of blocks [start, end), and each hop with the input it saw (kept for backward)."""
        saved = []
        hops = await reroute(self.router, self.bans, start, end)
        while hops:
            hop = hops[0]
            hop_prompts = None if prompts is None else prompts[hop.start:hop.end]
            try:
                reply = await self._call(hop, Forward(hidden, hop.start, hop.end, attention_mask, position_ids,
                                                      hop_prompts, self.client_config.active_adapter), retry)
            except _Reroute:
                hops = await reroute(self.router, self.bans, hop.start, end)
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


class _Reroute(Exception):
    """A hop failed and was banned; route its blocks again."""


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module: RemoteSequential, hidden, attention_mask, position_ids, prompts):
        out, saved = module.bus.run(module._forward_range(
            0, module.num_blocks, hidden.detach(), attention_mask, position_ids,
            None if prompts is None else prompts.detach(), Retry(module.client_config.max_retries)))
        ctx.module, ctx.saved = module, saved
        ctx.aux = (attention_mask, position_ids, None if prompts is None else prompts.detach())
        return out.to(hidden.device, hidden.dtype)  # the client may compute on a GPU

    @staticmethod
    def backward(ctx, grad_out):
        attention_mask, position_ids, prompts = ctx.aux
        module = ctx.module
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        grad_hidden = module.bus.run(module._backward_hops(ctx.saved, grad_out.contiguous(), attention_mask,
                                                           position_ids, prompts, grad_prompts,
                                                           Retry(module.client_config.max_retries)))
        dtype = ctx.saved[0][1].dtype
        return None, grad_hidden.to(ctx.saved[0][1].device, dtype), None, None, grad_prompts
