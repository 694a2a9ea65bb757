"""Wire codecs: round trips, the fp16/lz4/int8 rules, and hostile input only ever raising CodecError."""

import math
import warnings

import lz4.frame
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla.compression import BLOCK, CODECS, DTYPES, CodecError, TensorSpec, decode, encode

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
FLOAT_WIRES = [None, *FLOATS]
SHAPES = ["0d", "empty", "vector", "transposed"]
MIB16_ELEMENTS = (16 << 20) // 4
INT8_MAX_REL_ERROR = 0.01


def make(dtype: torch.dtype, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"0d": (), "empty": (0, 5), "vector": (3,), "transposed": (4, 3, 2)}[kind]
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
    elif dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.5
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)
    if kind == "transposed":
        t = t.permute(2, 1, 0)
        assert not t.is_contiguous() and t.shape == (2, 3, 4)
    return t


def wire_roundtrip(t, codec="raw", wire_dtype=None, buffer_type=bytes):
    spec, frame = encode(t, codec, wire_dtype)
    received = TensorSpec.from_wire(msgpack.unpackb(msgpack.packb(spec.to_wire())))
    assert received == spec
    return spec, frame, decode(received, buffer_type(frame))


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / x.double().norm()).item()


def check_lossless_or_cast(t, spec, y, wire_dtype):
    assert y.dtype == t.dtype and y.shape == t.shape and y.device.type == "cpu"
    wire = wire_dtype if (t.is_floating_point() and wire_dtype is not None) else t.dtype
    assert spec.wire == str(wire).removeprefix("torch.")
    assert torch.equal(y, t.to(wire).to(t.dtype))


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("wire_dtype", FLOAT_WIRES, ids=str)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_float_roundtrip(dtype, codec, wire_dtype, kind):
    t = make(dtype, kind)
    spec, _, y = wire_roundtrip(t, codec, wire_dtype)
    if codec != "int8":
        check_lossless_or_cast(t, spec, y, wire_dtype)
        return
    assert spec.codec == "int8" and spec.wire == str(wire_dtype or torch.float16).removeprefix("torch.")
    assert y.dtype == t.dtype and y.shape == t.shape
    step = t.abs().max().float() / 127 if t.numel() else 0.0
    torch.testing.assert_close(y.float(), t.float(), atol=step, rtol=1e-2)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("wire_dtype", [None, torch.float16], ids=str)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", INTS, ids=str)
def test_int_and_bool_roundtrip_ignore_wire_and_int8(dtype, codec, wire_dtype, kind):
    t = make(dtype, kind)
    spec, _, y = wire_roundtrip(t, codec, wire_dtype)
    assert spec.codec in ("raw", "lz4") and spec.dtype == spec.wire
    check_lossless_or_cast(t, spec, y, wire_dtype)


@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview], ids=lambda b: b.__name__)
def test_buffer_types(buffer_type):
    t = torch.randn(5, 7)
    for codec in CODECS:
        _, _, y = wire_roundtrip(t, codec, torch.float16, buffer_type)
        assert y.shape == t.shape


@pytest.fixture(scope="module")
def big():
    return torch.randn(MIB16_ELEMENTS, generator=torch.Generator().manual_seed(1)).view(1024, -1)


def test_16mib_raw_is_zero_copy_and_exact(big):
    assert big.nbytes == 16 << 20
    spec, frame, y = wire_roundtrip(big, "raw", None, memoryview)
    assert isinstance(frame, memoryview) and frame.nbytes == big.nbytes
    assert torch.equal(y, big)


def test_16mib_fp16_and_lz4_skip(big):
    spec, frame, y = wire_roundtrip(big, "lz4", torch.float16)
    assert (spec.codec, spec.wire, len(frame)) == ("raw", "float16", big.nbytes // 2)
    assert torch.equal(y, big.half().float())


def test_16mib_int8(big):
    spec, frame, y = wire_roundtrip(big, "int8")
    assert len(frame) == big.numel() // BLOCK * 2 + big.numel()
    assert rel_error(big, y) < INT8_MAX_REL_ERROR


def test_16mib_zeros_lz4():
    z = torch.zeros(MIB16_ELEMENTS)
    spec, frame, y = wire_roundtrip(z, "lz4")
    assert spec.codec == "lz4" and z.nbytes / len(frame) > 200
    assert torch.equal(y, z)


def test_fp16_overflow_falls_back_to_bfloat16():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    x[::7] = 1e5
    x[3] = -22512.0
    spec, frame, y = wire_roundtrip(x, "raw", torch.float16)
    assert spec.wire == "bfloat16" and len(frame) == x.numel() * 2
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x, rtol=2**-8, atol=1e-2)


def test_fp16_at_max_stays_fp16_and_nonfinite_passes_through():
    x = torch.tensor([65504.0, -65504.0, 1.5, float("inf"), float("-inf"), float("nan")])
    spec, _, y = wire_roundtrip(x, "raw", torch.float16)
    assert spec.wire == "float16"
    torch.testing.assert_close(y, x, equal_nan=True)
    x[2] = 1e5  # now a finite value overflows fp16: bf16, still passing inf/nan through
    spec, _, y = wire_roundtrip(x, "raw", torch.float16)
    assert spec.wire == "bfloat16"
    assert y[3] == math.inf and y[4] == -math.inf and y[5].isnan() and y[2] == 99840.0


def test_int8_scales_fall_back_to_float32_on_fp16_overflow_or_underflow():
    for scale in (1e5, 1e-7):
        x = torch.randn(300, generator=torch.Generator().manual_seed(3)) * scale
        spec, frame, y = wire_roundtrip(x, "int8")
        assert spec.wire == "float32" and len(frame) == math.ceil(300 / BLOCK) * 4 + 300
        assert torch.isfinite(y).all() and rel_error(x, y) < INT8_MAX_REL_ERROR


def test_int8_relative_error_under_one_percent():
    x = torch.randn(BLOCK * 100 + 17, generator=torch.Generator().manual_seed(4)) * 3
    spec, frame, y = wire_roundtrip(x, "int8")
    err = rel_error(x, y)
    assert err < INT8_MAX_REL_ERROR, f"int8 ||x-y||/||x|| = {err:.4f}"
    assert len(frame) == 101 * 2 + x.numel()


def test_int8_zero_block_and_nonfinite_block():
    x = torch.zeros(3 * BLOCK)
    x[BLOCK:2 * BLOCK] = torch.linspace(-1, 1, BLOCK)
    x[2 * BLOCK] = math.inf
    _, _, y = wire_roundtrip(x, "int8")
    assert torch.equal(y[:BLOCK], x[:BLOCK])
    assert rel_error(x[BLOCK:2 * BLOCK], y[BLOCK:2 * BLOCK]) < INT8_MAX_REL_ERROR
    assert y[2 * BLOCK:].isnan().all()


def test_lz4_skipped_for_random_fp16_activations():
    x = torch.randn(1, 128, 576, generator=torch.Generator().manual_seed(5)).half()
    spec, frame, y = wire_roundtrip(x, "lz4")
    assert spec.codec == "raw" and isinstance(frame, memoryview)
    assert torch.equal(y, x)


@pytest.mark.parametrize(
    "t, min_ratio",
    [
        # int64 ids: lz4 squeezes out the zero high bytes, which tops out near 2x
        (torch.arange(4096), 1.95),
        (torch.randint(0, 49152, (1, 2048), generator=torch.Generator().manual_seed(6)), 1.8),
        (torch.zeros(1, 2048, dtype=torch.int64), 50),
        (torch.ones(1, 2048, dtype=torch.bool), 20),
    ],
    ids=["arange", "token_ids", "zeros", "mask"],
)
def test_lz4_used_where_it_pays(t, min_ratio):
    spec, frame, y = wire_roundtrip(t, "lz4")
    assert spec.codec == "lz4" and t.nbytes / len(frame) > min_ratio
    assert torch.equal(y, t)


def test_raw_encode_is_zero_copy():
    t = torch.randn(16)
    _, frame = encode(t)
    t[0] = 42.0
    assert np.frombuffer(frame, np.float32)[0] == 42.0
    b = torch.zeros(8, dtype=torch.bfloat16)
    _, frame = encode(b)
    b[1] = 1.0
    assert np.frombuffer(frame, np.int16)[1] == torch.tensor(1.0, dtype=torch.bfloat16).view(torch.int16)


def test_decode_shares_writable_frames_copies_readonly_without_warning():
    t = torch.arange(6, dtype=torch.float32)
    spec, frame = encode(t)
    shared = bytearray(frame)
    y = decode(spec, shared)
    shared[:4] = np.float32(7.0).tobytes()
    assert y[0] == 7.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for buf in (bytes(frame), memoryview(bytes(frame))):
            assert torch.equal(decode(spec, buf), t)


def test_decode_misaligned_frame():
    t = torch.randn(9, dtype=torch.float64)
    spec, frame = encode(t)
    buf = bytearray(1 + len(frame))
    buf[1:] = frame
    assert torch.equal(decode(spec, memoryview(buf)[1:]), t)


def _raw_spec(shape=(4,), dtype="float32", codec="raw", wire="float32"):
    return TensorSpec.from_wire([dtype, list(shape), codec, wire])


@pytest.mark.parametrize(
    "obj",
    [
        ["float32", [4], "zstd", "float32"],  # unknown codec
        ["float8", [4], "raw", "float32"],  # unknown dtype
        ["float32", [4], "raw", "complex64"],  # unknown wire dtype
        [b"float32", [4], "raw", "float32"],  # bytes, not str
        [["float32"], [4], "raw", "float32"],  # unhashable dtype
        ["float32", [-1, 4], "raw", "float32"],  # negative dim
        ["float32", [True], "raw", "float32"],  # bool is not a dim
        ["float32", [2.0], "raw", "float32"],  # float is not a dim
        ["float32", 4, "raw", "float32"],  # shape not a list
        ["float32", "4", "raw", "float32"],
        ["float32", None, "raw", "float32"],
        ["float32", [2**16, 2**16], "raw", "float32"],  # 2**32 elements
        ["float32", [2**70], "raw", "float32"],
        ["float32", [1] * 9, "raw", "float32"],  # too many dims
        ["int64", [4], "raw", "float16"],  # ints travel as themselves
        ["int64", [4], "int8", "int64"],  # int8 codec is floats only
        ["float32", [4], "raw", "int8"],  # floats travel as floats
        ["float32", [4], "raw"],  # wrong length
        {"dtype": "float32"},
        None,
    ],
)
def test_from_wire_rejects(obj):
    with pytest.raises(CodecError):
        TensorSpec.from_wire(obj)


def test_from_wire_accepts_the_limits():
    assert TensorSpec.from_wire(["uint8", [2**31], "raw", "uint8"]).numel == 2**31
    assert TensorSpec.from_wire(("bool", (1,) * 8, "lz4", "bool")).shape == (1,) * 8


@pytest.mark.parametrize("codec", CODECS)
def test_decode_rejects_truncated_and_extra_bytes(codec):
    t = torch.zeros(300) if codec == "lz4" else torch.randn(300)
    spec, frame = encode(t, codec)
    assert spec.codec == codec
    frame = bytes(frame)
    for bad in (frame[:-1], frame + b"\0", b"", frame[: len(frame) // 2]):
        with pytest.raises(CodecError):
            decode(spec, bad)


def test_decode_rejects_corrupt_lz4():
    t = torch.arange(5000)
    spec, frame = encode(t, "lz4")
    assert spec.codec == "lz4"
    corrupt = bytearray(frame)
    corrupt[len(corrupt) // 2] ^= 0x55
    for bad in (bytes(corrupt), b"\0" * len(frame), frame[:-4] + b"\0\0\0\0"):
        with pytest.raises(CodecError):
            decode(spec, bad)


def test_decode_rejects_lz4_size_claims():
    payload = lz4.frame.compress(bytes(64), content_checksum=True)
    with pytest.raises(CodecError, match="claims"):
        decode(_raw_spec((65,), "uint8", "lz4", "uint8"), payload)
    # A huge spec over a tiny frame is refused before anything is allocated.
    with pytest.raises(CodecError, match="cannot hold"):
        decode(_raw_spec((2**31,), "float64", "lz4", "float64"), payload)


def test_decode_rejects_huge_claim_with_small_frame():
    with pytest.raises(CodecError):
        decode(_raw_spec((2**31,), "float64", "raw", "float64"), bytes(64))
    with pytest.raises(CodecError):
        decode(_raw_spec((2**31,), "float32", "int8", "float16"), bytes(64))


def test_decode_rejects_bad_bool_bytes_and_non_buffers():
    spec = _raw_spec((2,), "bool", "raw", "bool")
    assert decode(spec, b"\x00\x01").tolist() == [False, True]
    with pytest.raises(CodecError):
        decode(spec, b"\x00\x02")
    for not_a_buffer in ("ab", 12, None):
        with pytest.raises(CodecError):
            decode(spec, not_a_buffer)


def test_encode_rejects_bad_requests():
    with pytest.raises(CodecError):
        encode(torch.zeros(2), "zstd")
    with pytest.raises(CodecError):
        encode(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(CodecError):
        encode(torch.zeros(2), "raw", torch.int8)
    with pytest.raises(CodecError):
        encode(torch.zeros((1,) * 9))


# Hostile input: arbitrary specs and frames must only ever raise CodecError.

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_names = st.one_of(st.sampled_from(DTYPES + ("float8", "complex64", "")), _junk)
_codecs = st.one_of(st.sampled_from(CODECS + ("zstd",)), _junk)
_dims = st.one_of(st.integers(0, 5), st.integers(-(2**40), 2**70), _junk)
_shapes = st.one_of(st.lists(_dims, max_size=10), st.lists(st.integers(0, 4), max_size=4), _junk)
_FLOAT_NAMES = [name for name in DTYPES if getattr(torch, name).is_floating_point]


@st.composite
def _plausible_spec_lists(draw):
    """Valid specs with small shapes, so that frames of the right size are cheap to draw."""
    dtype = draw(st.sampled_from(DTYPES))
    is_float = dtype in _FLOAT_NAMES
    codec = draw(st.sampled_from(CODECS if is_float else CODECS[:2]))
    wire = draw(st.sampled_from(_FLOAT_NAMES) if is_float else st.just(dtype))
    return [dtype, draw(st.lists(st.integers(0, 5), max_size=4)), codec, wire]


_hostile_spec_lists = st.one_of(
    st.tuples(_names, _shapes, _codecs, _names).map(list), st.lists(_junk, max_size=6), _junk
)
# Half plausible, half hostile (st.one_of would flatten the junk branches and drown the plausible ones).
_spec_lists = st.booleans().flatmap(
    lambda plausible: _plausible_spec_lists() if plausible else _hostile_spec_lists
)


def _expected_bytes(spec: TensorSpec) -> int:
    itemsize = getattr(torch, spec.wire).itemsize
    if spec.codec == "int8":
        return math.ceil(spec.numel / BLOCK) * itemsize + spec.numel
    return spec.numel * itemsize


@st.composite
def _hostile(draw):
    obj = draw(_spec_lists)
    try:
        spec = TensorSpec.from_wire(obj)
    except CodecError:
        spec = None
    frames = [st.binary(max_size=300)]
    if spec is not None and spec.numel <= 4096:
        size = _expected_bytes(spec)
        # Right-sized (and nearly right-sized) frames reach the decoders, not just the size check.
        sizes = st.integers(max(0, size - 2), size + 2)
        frames.append(sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n)))
        packed = st.binary(min_size=size, max_size=size).map(
            lambda b: lz4.frame.compress(b, content_checksum=True)
        )
        frames.append(packed)
        frames.append(st.tuples(packed, st.integers(0, 10**6), st.integers(1, 255)).map(_flip))
    frame = draw(st.one_of(frames))
    wrap = draw(st.sampled_from([bytes, bytearray, lambda b: memoryview(bytes(b))]))
    return obj, wrap(frame)


def _flip(args):
    packed, pos, mask = args
    out = bytearray(packed)
    out[pos % len(out)] ^= mask
    return bytes(out)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_hostile())
def test_hostile_specs_and_frames_only_raise_codec_error(case):
    obj, frame = case
    try:
        spec = TensorSpec.from_wire(obj)
        y = decode(spec, frame)
    except CodecError:
        return
    assert y.dtype == getattr(torch, spec.dtype) and tuple(y.shape) == spec.shape
