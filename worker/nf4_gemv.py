"""Batch-1 nf4 matrix-vector products on CUDA (nf4_gemv.cu), in place of bitsandbytes' 4-bit inference kernel.

An nf4 decode step is mostly reading weights, and bitsandbytes' kernel reads them at about a third of an H100's
copy bandwidth (perf/RESULTS.md, bench_gemv). This kernel reads bitsandbytes' own packed weights and
(double-quantized) scales in place, so nothing is re-laid out or stored twice: layers stay bitsandbytes'
Linear4bit, and every other shape (prefill, batches, backward) still runs through bitsandbytes.

The kernel is compiled at first use by NVRTC, which ships with PyTorch's CUDA builds: a worker needs no CUDA
compiler. It is an opaque custom op, so CUDA-graph capture and torch.compile both take it as one launch.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_gemv.cu")
LANES = 32
TABLE_ENTRIES = 256  # level pairs: one lookup a packed byte
BLOCKSIZE = 64  # weights per scale: the kernel's chunks are half a block
CHUNK_WEIGHTS = 32
SCALE_CODES = 256  # double quantization's code for the block scales, kept beside the table


@dataclass(frozen=True)
class KernelConfig:
    rows: int  # rows a warp computes together (each activation load serves them all)
    unroll: int  # 16-byte weight loads in flight per row before the first is used
    warps: int  # per thread block, sharing one table
    half_table: bool  # fp16 level pairs (half the shared-memory traffic, two conversions a byte)

    @property
    def name(self) -> str:
        return f"nf4_gemv_r{self.rows}_u{self.unroll}_w{self.warps}_{'h' if self.half_table else 'f'}"

    @property
    def shared_bytes(self) -> int:  # level pairs per lane, then the scales' codes
        return TABLE_ENTRIES * LANES * (4 if self.half_table else 8) + SCALE_CODES * 4


# the fastest in bench_gemv --sweep on an H100 (2026-12-06) for the 70B and 8B shapes' wide and narrow layers
DEFAULT_CONFIG = KernelConfig(rows=4, unroll=2, warps=8, half_table=False)
NARROW_CONFIG = KernelConfig(rows=1, unroll=4, warps=8, half_table=False)  # few rows: more warps in flight
NARROW_ROWS = 4096


def config_for(n: int) -> KernelConfig:
    config = DEFAULT_CONFIG if n >= NARROW_ROWS else NARROW_CONFIG
    return config if n % config.rows == 0 else NARROW_CONFIG


class Kernel:
    """One configuration compiled for one device, with its grid size (resident blocks fill the GPU once)."""

    def __init__(self, config: KernelConfig, device: torch.device):
        started = time.perf_counter()
        compile_kernel = getattr(torch.cuda, "compile_kernel", None) or torch.cuda._compile_kernel
        defines = dict(NAME=config.name, ROWS=config.rows, UNROLL=config.unroll, WARPS=config.warps,
                       LUT_HALF=int(config.half_table))
        with torch.cuda.device(device):
            self.fn = compile_kernel(SOURCE.read_text(), config.name,
                                     nvcc_options=[f"-D{k}={v}" for k, v in defines.items()])
            self.fn.set_shared_memory_config(config.shared_bytes)
            self.resident = _resident_blocks(self.fn, config) * torch.cuda.get_device_properties(device).multi_processor_count
        self.config = config
        log.info("compiled %s for %s in %.1f s (%d resident blocks)", config.name, device,
                 time.perf_counter() - started, self.resident)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, operands: tuple) -> None:
        """out (n bfloat16) = the weight of `operands` (see `operands`) times x (k bfloat16, 16-byte aligned)."""
        c = self.config
        weight, absmax_q, absmax, code2, offset, levels, n, k, nested, group = operands
        grid = max(1, min(self.resident, -(-(n // c.rows) // c.warps)))
        self.fn(grid=(grid, 1, 1), block=(c.warps * LANES, 1, 1), shared_mem=c.shared_bytes,
                args=[weight, absmax_q, absmax, code2, offset, levels, x, out, n, k, int(nested), group])


def _resident_blocks(fn, config: KernelConfig) -> int:
    lib = torch.cuda._utils._get_gpu_runtime_library()
    count = ctypes.c_int()
    torch.cuda._utils._check_cuda(lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(count), fn.func, config.warps * LANES, config.shared_bytes))
    return max(1, count.value)


_kernels: dict[tuple[KernelConfig, int], Kernel] = {}
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
    return len(state.shape) == 2 and state.shape[1] % CHUNK_WEIGHTS == 0 and weight.is_contiguous()


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


@functools.cache
def warm(device_index: int) -> None:
    """Compile every configuration before any CUDA graph captures a step (NVRTC cannot run inside a capture)."""
    for config in {DEFAULT_CONFIG, NARROW_CONFIG}:
        kernel(config, torch.device("cuda", device_index))
