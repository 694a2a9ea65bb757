"""The wire format: one msgpack header frame, then one frame per tensor.

    header = {"v": PROTOCOL_VERSION, "k": kind, "id": request_id,
              "b": {scalar fields}, "t": [TensorSpec.to_wire() or None, ...]}

"t" lists the message's tensor fields in declaration order (None for an absent
optional tensor, which has no frame). Tensors are encoded by compression.codecs;
"raw" tensors leave without a copy. Everything a peer sends is validated here, so
hostile input ends as a ProtocolError with a stable code and never reaches a handler.
"""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Union

import msgpack
import torch

from corolla.bus.errors import ErrorCode, ProtocolError
from corolla.bus.messages import REGISTRY
from corolla.compression import CODECS, CodecError, TensorSpec
from corolla.compression import decode as decode_tensor
from corolla.compression import encode as encode_tensor

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


@dataclass(frozen=True)
class Codec:
    """How float tensors of one message travel: codec name and wire dtype (None: as computed)."""

    name: str = "raw"
    wire_dtype: torch.dtype | None = None


RAW = Codec()


@dataclass
class Envelope:
    request_id: int
    message: Any
    reply_codec: Codec = RAW  # how the sender wants float tensors of the reply to travel


@dataclass(frozen=True)
class _Layout:
    tensor_fields: tuple[str, ...]
    scalar_types: dict[str, Any]
    required: frozenset[str]


_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        hints = typing.get_type_hints(cls)
        tensors, scalars, required = [], {}, set()
        for f in fields(cls):
            hint = hints[f.name]
            if torch.Tensor in (hint, *typing.get_args(hint)):
                tensors.append(f.name)
            else:
                scalars[f.name] = hint
            if f.default is MISSING and f.default_factory is MISSING and type(None) not in typing.get_args(hint):
                required.add(f.name)
        layout = _LAYOUTS[cls] = _Layout(tuple(tensors), scalars, frozenset(required))
    return layout


def encode(msg: Any, request_id: int, codec: Codec = RAW, reply_codec: Codec | None = None) -> list:
    """Frames for `msg`. Float tensors use `codec`; integer tensors ride lz4 (skipped where it does not pay).

    `reply_codec` asks the receiver to answer in that codec, so the sender alone chooses how activations travel.
    """
    layout = _layout(type(msg))
    body = {name: getattr(msg, name) for name in layout.scalar_types}
    specs, frames = [], []
    for name in layout.tensor_fields:
        tensor = getattr(msg, name)
        if tensor is None:
            specs.append(None)
            continue
        if tensor.is_floating_point():
            spec, frame = encode_tensor(tensor, codec.name, codec.wire_dtype)
        else:
            spec, frame = encode_tensor(tensor, "lz4")
        specs.append(spec.to_wire())
        frames.append(frame)
    header = {"v": PROTOCOL_VERSION, "k": msg.KIND, "id": request_id, "b": body, "t": specs}
    if reply_codec is not None:
        header["rc"] = [reply_codec.name, _dtype_name(reply_codec.wire_dtype)]
    return [msgpack.packb(header, use_bin_type=True), *frames]


def peek_request_id(header_frame) -> int | None:
    """Best-effort request id of a header that may be otherwise invalid, so even bad requests get a matched reply."""
    try:
        header = msgpack.unpackb(header_frame, raw=False)
        rid = header.get("id") if isinstance(header, dict) else None
        return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
    except Exception:
        return None


def decode(frames: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Validate and decode a frame list; raises ProtocolError for anything malformed."""
    if not frames:
        raise ProtocolError(ErrorCode.BAD_FRAMES, "empty message")
    buffers = [_buffer(f) for f in frames]
    total = sum(b.nbytes for b in buffers)
    if total > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {total} bytes exceeds the limit of {max_bytes}")
    if buffers[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header of {buffers[0].nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(buffers[0], raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict) or not {"v", "k", "id", "b", "t"} <= header.keys():
        raise ProtocolError(ErrorCode.BAD_HEADER, "header must be a map with keys v, k, id, b, t")
    version, kind, request_id, body, specs = (header[k] for k in ("v", "k", "id", "b", "t"))
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version!r}, this peer speaks {PROTOCOL_VERSION}")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(ErrorCode.BAD_HEADER, "request id must be an integer")
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {kind!r}")
    layout = _layout(cls)
    if not isinstance(body, dict) or not isinstance(specs, list):
        raise ProtocolError(ErrorCode.BAD_HEADER, "body must be a map and tensors a list")
    if len(specs) != len(layout.tensor_fields):
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"{kind} carries {len(layout.tensor_fields)} tensor slots, got {len(specs)}")
    present = [s for s in specs if s is not None]
    if len(present) != len(buffers) - 1:
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"header announces {len(present)} tensors, got {len(buffers) - 1} frames")
    reply_codec = _check_reply_codec(header.get("rc"))
    kwargs = _check_body(kind, layout, body)
    frame_iter = iter(buffers[1:])
    for name, raw_spec in zip(layout.tensor_fields, specs):
        if raw_spec is None:
            if name in layout.required:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind} needs tensor {name!r}")
            kwargs[name] = None
            continue
        try:
            kwargs[name] = decode_tensor(TensorSpec.from_wire(raw_spec), next(frame_iter))
        except CodecError as e:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r}: {e}") from None
    return Envelope(request_id, cls(**kwargs), reply_codec)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


_WIRE_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_reply_codec(rc: Any) -> Codec:
    if rc is None:
        return RAW
    if (not isinstance(rc, list) or len(rc) != 2 or rc[0] not in CODECS
            or not (rc[1] is None or rc[1] in _WIRE_FLOATS)):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"reply codec must be [codec, float dtype or nil], got {rc!r}")
    return Codec(rc[0], None if rc[1] is None else _WIRE_FLOATS[rc[1]])


def _buffer(frame) -> memoryview:
    buf = getattr(frame, "buffer", frame)
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def _check_body(kind: str, layout: _Layout, body: dict) -> dict:
    unknown = body.keys() - layout.scalar_types.keys()
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind} has no fields {sorted(map(str, unknown))}")
    missing = (layout.required - set(layout.tensor_fields)) - body.keys()
    if missing:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind} needs fields {sorted(missing)}")
    for name, value in body.items():
        if not _matches(value, layout.scalar_types[name]):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind}.{name} has the wrong type {type(value).__name__}")
    return dict(body)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, val = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, val) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
