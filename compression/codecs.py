"""Tensor codecs for the wire: one tensor becomes a small spec plus ONE frame.

The spec (``TensorSpec.to_wire()``) travels in the msgpack header; the frame is a
separate ZeroMQ frame, so the common case (``raw``, same dtype, CPU, contiguous)
costs no copy on the sender. A receiver trusts nothing: ``TensorSpec.from_wire``
and ``decode`` turn every malformed input into ``CodecError`` and check byte
counts before allocating, so a peer cannot make us allocate more than it sent
(times lz4's maximum expansion).

Codecs and their frame layouts (all little-endian, as torch/numpy on the hosts
we run on):

``raw``
    The values in ``spec.wire`` dtype, C order. bfloat16 goes as its raw 16-bit
    patterns (numpy has no bf16). A float tensor sent in float16 whose finite
    values do not fit float16 (|x| > 65504, as in real LLM hidden states) goes
    as bfloat16 instead of turning into inf; NaN/inf already in the input pass
    through unchanged.
``lz4``
    The ``raw`` bytes as one lz4 frame (content size and content checksum
    stored, so truncation and corruption are detected). Used only where it
    pays: a probe on the first ``LZ4_PROBE_BYTES`` must shrink by
    ``LZ4_MIN_RATIO``, otherwise the frame is sent ``raw`` and the spec says so.
    Float activations do not compress (measured 1.00x on fp16 hidden states);
    token ids, masks and zeros do.
``int8``
    Lossy, floats only (integer/bool tensors go ``raw``). The flattened tensor
    is cut into blocks of ``BLOCK`` values (the last one zero-padded); each
    block has scale = max|x| and values round(x / scale * 127). Frame =
    ``ceil(n / BLOCK)`` scales in ``spec.wire`` dtype (float16 unless asked
    otherwise; float32 where a float16 scale would overflow or underflow to
    zero/subnormal) followed by ``n`` int8 values (padding is not sent). A block
    holding NaN/inf decodes as all NaN: int8 cannot carry them, and silently
    zeroing them would hide the fault.

Received frames are often read-only (``zmq.Frame.buffer``, ``bytes``). torch
has no read-only tensors, so ``decode`` copies a read-only frame before viewing
it instead of aliasing memory the owner believes immutable; writable frames
(``bytearray``, writable memoryviews) are shared without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lz4.block
import lz4.frame
import torch

__all__ = ["BLOCK", "CODECS", "DTYPES", "CodecError", "TensorSpec", "decode", "encode"]

CODECS = ("raw", "lz4", "int8")

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
DTYPES = tuple(_TORCH_DTYPES)

MAX_DIMS = 8
MAX_ELEMENTS = 2**31

FP16_MAX = torch.finfo(torch.float16).max  # 65504
FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal float16, 6.1e-5

LZ4_PROBE_BYTES = 1024
LZ4_MIN_RATIO = 1.05
# lz4 encodes at most 255 output bytes per input byte; a frame claiming more
# than this many times its own size is a decompression bomb, rejected unread.
LZ4_MAX_EXPANSION = 256

BLOCK = 64
INT8_MAX = 127
INT8_DEFAULT_SCALE = torch.float16


class CodecError(ValueError):
    """A spec or frame that must be rejected (or a request encode cannot honour)."""


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver needs to rebuild a tensor from its frame; validated on creation."""

    dtype: str
    shape: tuple[int, ...]
    codec: str
    wire: str

    def __post_init__(self) -> None:
        for field in (self.dtype, self.wire):
            if not isinstance(field, str) or field not in _TORCH_DTYPES:
                raise CodecError(f"unknown dtype {field!r}")
        if not isinstance(self.codec, str) or self.codec not in CODECS:
            raise CodecError(f"unknown codec {self.codec!r}")
        if not isinstance(self.shape, tuple):
            raise CodecError(f"shape must be a tuple, got {type(self.shape).__name__}")
        if len(self.shape) > MAX_DIMS:
            raise CodecError(f"{len(self.shape)} dims, at most {MAX_DIMS} allowed")
        for dim in self.shape:
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise CodecError(f"bad dimension {dim!r} in shape")
        if math.prod(self.shape) > MAX_ELEMENTS:
            raise CodecError(f"shape {self.shape} exceeds {MAX_ELEMENTS} elements")
        dtype, wire = _TORCH_DTYPES[self.dtype], _TORCH_DTYPES[self.wire]
        if dtype.is_floating_point:
            if not wire.is_floating_point:
                raise CodecError(f"float tensor cannot travel as {self.wire}")
        elif self.codec == "int8" or wire != dtype:
            raise CodecError(f"{self.dtype} tensor cannot travel as {self.codec}/{self.wire}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_wire(self) -> list:
        return [self.dtype, list(self.shape), self.codec, self.wire]

    @classmethod
    def from_wire(cls, obj) -> TensorSpec:
        if not isinstance(obj, (list, tuple)) or len(obj) != 4:
            raise CodecError("spec must be a list [dtype, shape, codec, wire]")
        dtype, shape, codec, wire = obj
        if not isinstance(shape, (list, tuple)):
            raise CodecError(f"shape must be a list, got {type(shape).__name__}")
        return cls(dtype, tuple(shape), codec, wire)


def encode(
    t: torch.Tensor, codec: str = "raw", wire_dtype: torch.dtype | None = None
) -> tuple[TensorSpec, memoryview | bytes]:
    """Encode ``t`` as (spec, frame); see the module docstring for the codecs.

    ``wire_dtype`` picks the float dtype values travel in (``int8``: the scale
    dtype); integer/bool tensors ignore it. ``spec.codec``/``spec.wire`` record
    what was actually used. ``raw`` with the tensor's own dtype on a contiguous
    CPU tensor returns a memoryview over the tensor's memory: do not modify the
    tensor until the frame is sent.
    """
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}")
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise CodecError(f"unsupported dtype {t.dtype}")
    if wire_dtype is not None and t.is_floating_point() and (
        wire_dtype not in _DTYPE_NAMES or not wire_dtype.is_floating_point
    ):
        raise CodecError(f"unsupported float wire dtype {wire_dtype}")
    t = t.detach()
    shape = tuple(t.shape)
    if codec == "int8" and t.is_floating_point():
        scales_dtype, frame = _encode_int8(t, wire_dtype or INT8_DEFAULT_SCALE)
        return TensorSpec(name, shape, "int8", _DTYPE_NAMES[scales_dtype]), frame
    wire = _wire_dtype(t, wire_dtype)
    frame = _bytes_of(t.to(wire).cpu().contiguous())
    if codec == "lz4":
        packed = _lz4_if_it_pays(frame)
        if packed is not None:
            return TensorSpec(name, shape, "lz4", _DTYPE_NAMES[wire]), packed
    return TensorSpec(name, shape, "raw", _DTYPE_NAMES[wire]), frame


def decode(spec: TensorSpec, buf) -> torch.Tensor:
    """Rebuild the CPU tensor described by ``spec`` from ``buf``; CodecError if they disagree."""
    try:
        frame = memoryview(buf).cast("B")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"frame is not a contiguous buffer: {exc}") from exc
    dtype, wire = _TORCH_DTYPES[spec.dtype], _TORCH_DTYPES[spec.wire]
    n = spec.numel
    if spec.codec == "int8":
        x = _decode_int8(frame, n, wire, dtype)
    else:
        expected = n * wire.itemsize
        if spec.codec == "lz4":
            frame = _lz4_unpack(frame, expected)
        elif frame.nbytes != expected:
            raise CodecError(f"frame has {frame.nbytes} bytes, spec needs {expected}")
        x = _view(_writable(frame), wire)
    return x.view(spec.shape).to(dtype)


def _wire_dtype(t: torch.Tensor, asked: torch.dtype | None) -> torch.dtype:
    if not t.is_floating_point() or asked is None:
        return t.dtype
    if asked == torch.float16 and t.dtype != torch.float16 and _finite_absmax(t) > FP16_MAX:
        return torch.bfloat16
    return asked


def _finite_absmax(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)  # one pass, no temporary; NaN/inf fall to the slow path
    absmax = torch.maximum(hi, -lo).item()
    if math.isfinite(absmax):
        return absmax
    finite = t[torch.isfinite(t)]
    return finite.abs().amax().item() if finite.numel() else 0.0


def _bytes_of(t: torch.Tensor) -> memoryview:
    """Flat byte view of a contiguous CPU tensor's own memory (keeps the tensor alive)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _writable(frame: memoryview) -> memoryview:
    return memoryview(bytearray(frame)) if frame.readonly else frame


def _view(frame: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """1-D tensor of ``dtype`` over a writable frame whose size is already checked."""
    if frame.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.bool:
        raw = torch.frombuffer(frame, dtype=torch.uint8)
        if (raw > 1).any():
            raise CodecError("bool frame holds bytes other than 0 and 1")
        return raw.view(torch.bool)
    x = torch.frombuffer(frame, dtype=dtype)
    return x.clone() if x.data_ptr() % dtype.itemsize else x


def _lz4_if_it_pays(frame: memoryview) -> bytes | None:
    probe = frame[:LZ4_PROBE_BYTES]
    if probe.nbytes == 0:
        return None
    if probe.nbytes / len(lz4.block.compress(probe, store_size=False)) < LZ4_MIN_RATIO:
        return None
    packed = lz4.frame.compress(frame, store_size=True, content_checksum=True)
    return packed if len(packed) < frame.nbytes else None


def _lz4_unpack(frame: memoryview, expected: int) -> memoryview:
    if expected > LZ4_MAX_EXPANSION * frame.nbytes:
        raise CodecError(f"lz4 frame of {frame.nbytes} bytes cannot hold {expected}")
    try:
        claimed = lz4.frame.get_frame_info(frame)["content_size"]
        if claimed != expected:
            raise CodecError(f"lz4 frame claims {claimed} bytes, spec needs {expected}")
        decompressor = lz4.frame.LZ4FrameDecompressor(return_bytearray=True)
        out = decompressor.decompress(frame, max_length=expected)
    except RuntimeError as exc:  # python-lz4 reports every LZ4F error as RuntimeError
        raise CodecError(f"corrupt lz4 frame: {exc}") from exc
    if len(out) != expected or not decompressor.eof or decompressor.unused_data:
        raise CodecError(f"lz4 frame does not decode to exactly {expected} bytes")
    return memoryview(out)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _encode_int8(t: torch.Tensor, scales_dtype: torch.dtype) -> tuple[torch.dtype, memoryview]:
    n = t.numel()
    blocks = -(-n // BLOCK)
    x = t.reshape(-1).to(_compute_dtype(t.dtype))
    if n % BLOCK:
        x = torch.nn.functional.pad(x, (0, blocks * BLOCK - n))
    x = x.view(blocks, BLOCK)
    absmax = x.abs().amax(dim=1)
    if scales_dtype == torch.float16 and not _fits_fp16(absmax):
        scales_dtype = torch.float32
    scales = absmax.to(scales_dtype)
    # Quantize against the scale as it travels, so the receiver's product matches.
    # 0/0 (all-zero block) and inf/inf (non-finite block) give NaN: send 0 there.
    q = x * (INT8_MAX / scales.to(x.dtype)).unsqueeze(1)
    q = q.round_().clamp_(-INT8_MAX, INT8_MAX).nan_to_num_(0.0).to(torch.int8)
    scales_bytes = blocks * scales_dtype.itemsize
    out = torch.empty(scales_bytes + n, dtype=torch.uint8, device=t.device)
    out[:scales_bytes].view(scales_dtype).copy_(scales)
    out[scales_bytes:].view(torch.int8).copy_(q.view(-1)[:n])
    return scales_dtype, _bytes_of(out.cpu())


def _fits_fp16(absmax: torch.Tensor) -> bool:
    if absmax.numel() == 0:
        return True
    lo, hi = torch.aminmax(absmax)  # common case, decided without masking; NaN fails both tests
    if FP16_TINY <= lo.item() and hi.item() <= FP16_MAX:
        return True
    finite = absmax[torch.isfinite(absmax) & (absmax > 0)]
    return finite.numel() == 0 or bool(((finite >= FP16_TINY) & (finite <= FP16_MAX)).all())


def _decode_int8(
    frame: memoryview, n: int, scales_dtype: torch.dtype, dtype: torch.dtype
) -> torch.Tensor:
    blocks = -(-n // BLOCK)
    scales_bytes = blocks * scales_dtype.itemsize
    if frame.nbytes != scales_bytes + n:
        raise CodecError(f"int8 frame has {frame.nbytes} bytes, spec needs {scales_bytes + n}")
    frame = _writable(frame)
    compute = _compute_dtype(dtype)
    scales = _view(frame[:scales_bytes], scales_dtype).to(compute)
    x = torch.zeros(blocks * BLOCK, dtype=compute)
    x[:n] = _view(frame[scales_bytes:], torch.int8)
    x = x.view(blocks, BLOCK).mul_((scales / INT8_MAX).unsqueeze(1))
    return x.view(-1)[:n]
