"""Corolla's nf4 matrix-vector kernel (worker/nf4_gemv.py) against bitsandbytes' dequantized weights, on a GPU.

Skipped where there is no CUDA device or no bitsandbytes (CI); run on a GPU machine with
`python -m pytest tests/test_nf4_gemv.py`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from corolla.worker import nf4_gemv  # noqa: E402
from corolla.worker.quantize import NF4, quantize_linears  # noqa: E402

REL_TOLERANCE = 1e-2  # bf16 in and out, float32 sums: ~3e-3


def nf4_linear(n: int, k: int, nested: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(linear.weight, std=0.02)
    holder = nn.ModuleList([linear])
    quantize_linears(holder, NF4)
    layer = holder[0]
    if not nested:  # requantize with plain float32 block scales
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=False, module=layer)._quantize("cuda")
    return layer


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return x.float() @ w.t()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


# rows below and above the narrow/wide switch, a row of one scale block, rows whose blocks are no multiple of a
# step's, more tiles than a persistent grid holds (8192); rows no multiple of a tile's (4098) fall back to
# bitsandbytes' kernel
@pytest.mark.parametrize("n,k", [(256, 512), (96, 576), (4112, 1216), (4096, 64), (1024, 8192), (8192, 1024),
                                 (4098, 1024)])
@pytest.mark.parametrize("nested", [True, False])
def test_kernel_matches_dequantized_weights(n, k, nested):
    layer = nf4_linear(n, k, nested)
    assert layer.weight.quant_state.nested == nested
    assert nf4_gemv.supports(layer.weight) == (n % nf4_gemv.TILE_ROWS == 0)
    for seed in range(2):  # fresh inputs each time
        torch.manual_seed(100 + seed)
        x = torch.randn(1, 1, k, dtype=torch.bfloat16, device="cuda")
        with torch.inference_mode():
            out = layer(x)
        assert out.shape == (1, 1, n) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert rel_error(out, reference(layer, x)) < REL_TOLERANCE


# 35 scale blocks a row: every unroll leaves a partial step; then a persistent grid of 7 thread blocks, each walking
# ~5 of the 33 tiles
@pytest.mark.parametrize("persistent_grid", [None, 7])
@pytest.mark.parametrize("nested", [True, False])
def test_every_configuration_matches(nested, persistent_grid):
    layer = nf4_linear(528, 2240, nested)
    x = torch.randn(2240, dtype=torch.bfloat16, device="cuda")
    ref = reference(layer, x)
    ops = nf4_gemv.operands(layer.weight)
    for unroll in (1, 2, 3, 4):
        for warps in (1, 4, 8, 16):
            config = nf4_gemv.KernelConfig(unroll, warps, persistent=persistent_grid is not None)
            kernel = nf4_gemv.kernel(config, x.device)
            if persistent_grid:
                kernel = copy.copy(kernel)  # the cached one keeps its grid
                kernel.resident = persistent_grid
            out = torch.full((528,), float("nan"), dtype=torch.bfloat16, device="cuda")  # every one written
            kernel(x, out, ops)
            assert torch.isfinite(out).all() and rel_error(out, ref) < REL_TOLERANCE, config


def test_several_tokens_and_gradients_stay_on_bitsandbytes():
    layer = nf4_linear(256, 512)
    x = torch.randn(1, 5, 512, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        assert rel_error(layer(x), reference(layer, x)) < REL_TOLERANCE
    one = torch.randn(1, 1, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    layer(one).float().sum().backward()
    assert one.grad is not None and torch.isfinite(one.grad).all()


def test_graph_replay_and_compile_take_the_kernel():
    layer = nf4_linear(1024, 1024)
    static = torch.randn(1, 1, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        layer(static)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static)
        for seed in range(2):
            torch.manual_seed(seed)
            static.copy_(torch.randn_like(static))
            graph.replay()
            assert rel_error(out, reference(layer, static)) < REL_TOLERANCE
        compiled = torch.compile(lambda x: layer(x) * 2, fullgraph=True)
        assert rel_error(compiled(static), 2 * reference(layer, static)) < REL_TOLERANCE
