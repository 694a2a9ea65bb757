"""Batch-1 nf4 matrix-vector products on CUDA (nf4_gemv.cu), in place of bitsandbytes' 4-bit inference kernel.

An nf4 decode step is mostly reading weights, and bitsandbytes' kernel reads them at about a third of an H100's
copy bandwidth (perf/RESULTS.md, bench_gemv); this one reads a 70B block's at 59% (1.7x). It reads bitsandbytes'
own packed weights and (double-quantized) scales in place, so nothing is re-laid out or stored twice: layers stay
bitsandbytes' Linear4bit, and every other shape (prefill, batches, backward, rows that are no whole tiles) still
runs through bitsandbytes. Its sums are nearer the dequantized weights' than bitsandbytes' (2.9e-3 against 3.8e-3
relative), but not the same, so greedy tokens can part from transformers + bitsandbytes' (at the 70B shape with
random weights, after the first); workers can keep bitsandbytes' kernel instead (`nf4_kernel: false`).

The kernel is compiled at first use by NVRTC, which ships with PyTorch's CUDA builds: a worker needs no CUDA
compiler. It is an opaque custom op, so CUDA-graph capture and torch.compile both take it as one launch.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_gemv.cu")
LANES = 32
TILE_ROWS = 16  # a warp's tile: the rows of one tensor-core product
TABLE_BYTES = 256 * LANES * 4  # bfloat16 level pairs, one a packed byte, a copy per lane
SCALE_CODES = 256  # double quantization's code for the block scales, kept beside the table
BLOCKSIZE = 64  # weights per scale: a row must hold whole blocks


@dataclass(frozen=True)
class KernelConfig:
    unroll: int  # 16-byte weight loads a lane has in flight per row (2 scale blocks each), 1 to 4
    warps: int  # per thread block, splitting a tile's columns between them and sharing one table
    persistent: bool  # one resident grid walks all tiles, instead of a thread block per tile

    @property
    def name(self) -> str:
        return f"nf4_gemv_u{self.unroll}_w{self.warps}"

    @property
    def shared_bytes(self) -> int:  # level pairs, the scales' codes, then each warp's sums of its tile
        return TABLE_BYTES + SCALE_CODES * 4 + self.warps * TILE_ROWS * 4


# the fastest for a 70B block's wide layers, and for the narrow (k, v) layers of both the 70B and 8B shapes, in sweeps
# of every configuration on an H100 (2026-12-06 and 2026-12-07, perf/RESULTS.md)
DEFAULT_CONFIG = KernelConfig(unroll=2, warps=4, persistent=True)
NARROW_CONFIG = KernelConfig(unroll=2, warps=16, persistent=True)
NARROW_ROWS = 4096


def config_for(n: int) -> KernelConfig:
    return DEFAULT_CONFIG if n >= NARROW_ROWS else NARROW_CONFIG


class Kernel:
    """One configuration on one device: its compiled function (shared by the persistent and plain grids) and its grid
    size (resident blocks fill the GPU once)."""

    def __init__(self, config: KernelConfig, device: torch.device):
        self.config = config
        self.fn, self.resident = _compiled(config, device)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, operands: tuple) -> None:
        """out (n bfloat16) = the weight of `operands` (see `operands`) times x (k bfloat16, 16-byte aligned)."""
        c = self.config
        weight, absmax_q, absmax, code2, offset, levels, n, k, nested, group = operands
        tiles = n // TILE_ROWS
        grid = min(self.resident, tiles) if c.persistent else tiles
        self.fn(grid=(grid, 1, 1), block=(c.warps * LANES, 1, 1), shared_mem=c.shared_bytes,
                args=[weight, absmax_q, absmax, code2, offset, levels, x, out, n, k, int(nested), group])


def _resident_blocks(fn, config: KernelConfig) -> int:
    lib = torch.cuda._utils._get_gpu_runtime_library()
    count = ctypes.c_int()
    torch.cuda._utils._check_cuda(lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(count), fn.func, config.warps * LANES, config.shared_bytes))
    return max(1, count.value)


def _compiled(config: KernelConfig, device: torch.device) -> tuple:
    key = (config.name, device.index)
    if key not in _functions:
        started = time.perf_counter()
        compile_kernel = getattr(torch.cuda, "compile_kernel", None) or torch.cuda._compile_kernel
        defines = dict(NAME=config.name, UNROLL=config.unroll, WARPS=config.warps)
        with torch.cuda.device(device):
            fn = compile_kernel(SOURCE.read_text(), config.name,
                                nvcc_options=[f"-D{k}={v}" for k, v in defines.items()])
            fn.set_shared_memory_config(config.shared_bytes)
            resident = _resident_blocks(fn, config) * torch.cuda.get_device_properties(device).multi_processor_count
        log.info("compiled %s for %s in %.1f s (%d resident blocks)", config.name, device,
                 time.perf_counter() - started, resident)
        _functions[key] = fn, resident
    return _functions[key]


_kernels: dict[tuple[KernelConfig, int], Kernel] = {}
_functions: dict[tuple[str, int], tuple] = {}  # a configuration's compiled function and resident blocks
_lock = threading.Lock()  # a worker's loader and compute threads may ask at once


def kernel(config: KernelConfig, device: torch.device) -> Kernel:
    key = (config, device.index if device.index is not None else torch.cuda.current_device())
    with _lock:
        if key not in _kernels:
            _kernels[key] = Kernel(config, torch.device("cuda", key[1]))
        return _kernels[key]


@torch.library.custom_op("corolla::nf4_gemv", mutates_args=())
def _gemv(x: torch.Tensor, weight: torch.Tensor, absmax_q: torch.Tensor, absmax: torch.Tensor,
          code2: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor, n: int, k: int, nested: bool,
          group: int) -> torch.Tensor:
    if x.data_ptr() % 16:  # the kernel reads activations 16 bytes at a time
        x = x.clone()
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    operands = (weight, absmax_q, absmax, code2, offset, levels, n, k, nested, group)
    kernel(config_for(n), x.device)(x, out, operands)
    return out


@_gemv.register_fake
def _(x, weight, absmax_q, absmax, code2, offset, levels, n, k, nested, group):
    return x.new_empty(n)


def supports(weight) -> bool:
    """Whether `weight` (a bitsandbytes Params4bit) is laid out as the kernel reads it."""
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or state.blocksize != BLOCKSIZE or not weight.is_cuda:
        return False
    return (len(state.shape) == 2 and state.shape[0] % TILE_ROWS == 0 and state.shape[1] % BLOCKSIZE == 0
            and weight.is_contiguous())


def operands(weight) -> tuple:
    """What the kernel reads of a Params4bit: packed codes, scales (nested or not), nf4 levels and sizes."""
    state = weight.quant_state
    n, k = state.shape
    if state.nested:
        offset = state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=weight.device)
        scales = (state.absmax, state.state2.absmax, state.state2.code, offset, True, state.state2.blocksize)
    else:  # plain float32 scales: the scales' codes are not read
        scales = (state.absmax, state.absmax, state.absmax, state.absmax, False, 1)
    q, absmax, code2, offset, nested, group = scales
    return weight.data, q, absmax, code2, offset, state.code, n, k, nested, group


def gemv(x: torch.Tensor, weight) -> torch.Tensor:
    """x (one token's bfloat16 features, any leading shape of size 1) times the nf4 `weight`'s transpose."""
    ops = operands(weight)
    return _gemv(x.reshape(-1).contiguous(), *ops).view(*x.shape[:-1], ops[6])
