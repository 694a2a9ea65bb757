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

    def __len__(self) -> int:
        return self.num_blocks

    def extra_repr(self) -> str:
        return f"blocks=0..{self.num_blocks}, remote"

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self.router, self.pool, self.bus, self.client_config, self.num_blocks, max_length)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return _RemoteForward.apply(self, hidden, attention_mask, position_ids, prompts)

    async def _forward_chain(self, hidden, attention_mask, position_ids, prompts) -> tuple[torch.Tensor, list]:
        """Outputs, and each hop with the input it saw (kept for backward)."""
        saved = []
        codec = self.client_config.activation_codec
        for hop in await self.router.chain(0, self.num_blocks):
            hop_prompts = None if prompts is None else prompts[hop.start:hop.end]
            saved.append((hop, hidden))
            reply = await self.pool.get(hop.endpoint).request(
                Forward(hidden, hop.start, hop.end, attention_mask, position_ids, hop_prompts,
                        self.client_config.active_adapter), self.client_config.request_timeout, codec)
            hidden = reply.hidden
        return hidden, saved

    async def _backward_chain(self, saved: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor, attention_mask,
                              position_ids, prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        codec = self.client_config.activation_codec
        prompt_grads = None if prompts is None else torch.zeros_like(prompts)
        for hop, hidden in reversed(saved):
            hop_prompts = None if prompts is None else prompts[hop.start:hop.end]
            reply = await self.pool.get(hop.endpoint).request(
                Backward(hidden, grad, hop.start, hop.end, attention_mask, position_ids, hop_prompts,
                         self.client_config.active_adapter), self.client_config.request_timeout, codec)
            grad = reply.grad_hidden
            if prompt_grads is not None and reply.grad_prompts is not None:
                prompt_grads[hop.start:hop.end] = reply.grad_prompts.to(prompt_grads.dtype)
        return grad, prompt_grads


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module: RemoteSequential, hidden, attention_mask, position_ids, prompts):
        out, saved = module.bus.run(module._forward_chain(hidden.detach(), attention_mask, position_ids,
                                                          None if prompts is None else prompts.detach()))
        ctx.module, ctx.saved = module, saved
        ctx.aux = (attention_mask, position_ids, None if prompts is None else prompts.detach())
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        attention_mask, position_ids, prompts = ctx.aux
        grad_hidden, grad_prompts = ctx.module.bus.run(
            ctx.module._backward_chain(ctx.saved, grad_out.contiguous(), attention_mask, position_ids, prompts))
        dtype = ctx.saved[0][1].dtype
        return None, grad_hidden.to(dtype), None, None, grad_prompts
