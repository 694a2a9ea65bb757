"""Quantized block weights on GPU workers: bitsandbytes int8 or nf4 in place of each nn.Linear.

Batch-1 decoding reads every weight once per token, so its speed is set by
weight bytes over memory bandwidth: nf4 reads ~4.1 bits a weight instead of 16.
The swap happens block by block as weights are made or loaded, so a span never
holds all of its 16-bit weights on the GPU at once. bitsandbytes' kernels need
CUDA; asking for quantization on a CPU worker is a configuration error. nf4
layers run one-token products through Corolla's own kernel (worker/nf4_gemv.py),
which reads the same weights at 1.3-1.7 times bitsandbytes' rate (unless a
worker sets nf4_kernel: false); everything else stays bitsandbytes'.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from corolla.worker import nf4_gemv
from corolla.worker.config import QUANTIZATIONS, ConfigError

NONE, INT8, NF4 = QUANTIZATIONS
NF4_COMPUTE_DTYPE = torch.bfloat16
# Vector-wise int8 without LLM.int8()'s outlier split: the split finds outlier columns on the host every call,
# which would keep the decode step out of a CUDA graph.
INT8_OUTLIER_THRESHOLD = 0.0


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("quantized weights need bitsandbytes: pip install 'corolla[gpu]'") from None
    return bitsandbytes


def quantize_linears(module: nn.Module, quantization: str, nf4_kernel: bool = True) -> int:
    """Replace every nn.Linear under `module` (weights already on the GPU) by its bitsandbytes twin; returns how many.
    `nf4_kernel=False` keeps bitsandbytes' kernel for one-token nf4 products too (the baseline benchmarks run)."""
    if quantization == NONE:
        return 0
    bnb = _bitsandbytes()
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for parent, name, linear in targets:
        setattr(parent, name, _quantized(bnb, linear, quantization, nf4_kernel))
    return len(targets)


def _quantized(bnb, linear: nn.Linear, quantization: str, nf4_kernel: bool) -> nn.Module:
    weight, bias = linear.weight.data, linear.bias
    device = weight.device
    if quantization == NF4:
        linear4bit = _linear4bit_gemv(bnb) if nf4_kernel else bnb.nn.Linear4bit
        layer = linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                           compute_dtype=NF4_COMPUTE_DTYPE, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         module=layer)._quantize(device)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=INT8_OUTLIER_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.data, requires_grad=False)
    return layer


@functools.cache
def _linear4bit_gemv(bnb) -> type:
    class Linear4bitGemv(bnb.nn.Linear4bit):
        """bitsandbytes' nf4 layer, with one-token products (decode steps) on Corolla's kernel."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if (x.numel() == self.in_features and x.dtype == torch.bfloat16 and nf4_gemv.supports(self.weight)
                    and not (x.requires_grad and torch.is_grad_enabled())):
                out = nf4_gemv.gemv(x, self.weight)
                return out if self.bias is None else out + self.bias.to(out.dtype)
            return super().forward(x)

    return Linear4bitGemv


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights a forward pass reads, quantization scales included: the decode step's memory floor."""
    total = 0
    for m in module.modules():
        for p in m.parameters(recurse=False):
            total += _nbytes(p)
            state = getattr(p, "quant_state", None)  # nf4: block scales, themselves quantized (double quantization)
            if state is not None:
                total += _nbytes(state.absmax)
                if state.state2 is not None:
                    total += _nbytes(state.state2.absmax)
        # int8: row scales, kept on the weight until the first forward moves them to the layer's state
        scales = getattr(getattr(m, "weight", None), "SCB", None)
        if scales is None:
            scales = getattr(getattr(m, "state", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += _nbytes(scales)
    return total


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
