"""The wire and the bus over real ZeroMQ sockets on loopback: round trips, every malformed input, concurrency."""
from __future__ import annotations

import threading

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla.bus import wire
from corolla.bus.client import BusLoop, Connection
from corolla.bus.errors import ErrorCode, RemoteError, RequestTimeout
from corolla.bus.messages import REGISTRY, ErrorReply, Forward, HiddenReply, Ping, Pong
from tests.bus_helpers import EchoServer, on_bus

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


@pytest.fixture(scope="module")
def server():
    s = EchoServer(max_bytes=64 << 20)
    yield s
    s.close()


@pytest.fixture()
def raw(server):
    """A plain DEALER socket, to send frames no well-behaved client would."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(server.endpoint)
    yield sock
    sock.close()


def call(server, msg, codec=wire.RAW, timeout=10.0):
    bus = BusLoop.get()

    async def go():
        conn = Connection(server.endpoint, bus.context)
        try:
            return await conn.request(msg, timeout, codec)
        finally:
            await conn.close()

    return bus.run(go())


def _sample(dtype, shape):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (3,), (2, 3, 4)], ids=str)
def test_round_trip_every_dtype_and_shape(server, dtype, shape):
    t = _sample(dtype, shape)
    reply = call(server, Forward(t, 0, 1))
    assert reply.hidden.dtype == dtype and tuple(reply.hidden.shape) == shape
    assert torch.equal(reply.hidden, t)


def test_round_trip_non_contiguous_and_large(server):
    t = torch.randn(64, 32).t()
    assert not t.is_contiguous()
    assert torch.equal(call(server, Forward(t, 0, 1)).hidden, t)
    big = torch.randn(4 << 20)  # 16 MiB of float32
    assert torch.equal(call(server, Forward(big, 0, 1)).hidden, big)


@pytest.mark.parametrize("codec,tol", [(wire.Codec("raw", torch.float16), 1e-3), (wire.Codec("raw", torch.bfloat16), 1e-2),
                                       (wire.Codec("lz4", torch.float16), 1e-3), (wire.Codec("int8", torch.float16), 2e-2)])
def test_activation_codecs_round_trip(server, codec, tol):
    t = torch.randn(2, 7, 64)
    out = call(server, Forward(t, 0, 1), codec)
    assert out.hidden.dtype == torch.float32
    assert (out.hidden - t).norm() / t.norm() < tol


def test_fp16_overflow_falls_back_instead_of_inf(server):
    t = torch.randn(1, 4, 8) * 1e5
    out = call(server, Forward(t, 0, 1), wire.Codec("raw", torch.float16))
    assert torch.isfinite(out.hidden).all()
    assert ((out.hidden - t).norm() / t.norm()) < 1e-2


def _reply(sock) -> tuple[int, object]:
    env = wire.decode(sock.recv_multipart())
    return env.request_id, env.message


def _good_header(**overrides):
    header = {"v": wire.PROTOCOL_VERSION, "k": "ping", "id": 7, "b": {}, "t": []}
    header.update(overrides)
    return msgpack.packb(header)


def _forward_frames(request_id=9, spec=None, frame=b"\0" * 16):
    spec = spec if spec is not None else ["float32", [4], "raw", "float32"]
    header = {"v": wire.PROTOCOL_VERSION, "k": "forward", "id": request_id, "b": {"start": 0, "end": 1},
              "t": [spec, None, None, None]}
    return [msgpack.packb(header), frame]


MALFORMED = {
    "truncated header": ([_good_header()[:-3]], ErrorCode.BAD_HEADER),
    "not msgpack": ([b"\xc1\xc1\xc1 garbage"], ErrorCode.BAD_HEADER),
    "header not a map": ([msgpack.packb([1, 2, 3])], ErrorCode.BAD_HEADER),
    "unknown version": ([_good_header(v=99)], ErrorCode.BAD_VERSION),
    "unknown kind": ([_good_header(k="teleport")], ErrorCode.UNKNOWN_KIND),
    "extra frame": ([_good_header(), b"x"], ErrorCode.BAD_FRAMES),
    "missing frame": (_forward_frames()[:1], ErrorCode.BAD_FRAMES),
    "bytes do not match shape": (_forward_frames(frame=b"\0" * 15), ErrorCode.BAD_TENSOR),
    "unknown codec": (_forward_frames(spec=["float32", [4], "zstd", "float32"]), ErrorCode.BAD_TENSOR),
    "unknown dtype": (_forward_frames(spec=["complex64", [2], "raw", "complex64"]), ErrorCode.BAD_TENSOR),
    "negative dim": (_forward_frames(spec=["float32", [-4], "raw", "float32"]), ErrorCode.BAD_TENSOR),
    "wrong field type": ([msgpack.packb({"v": 1, "k": "open", "id": 3, "b": {"session_id": 5, "start": 0, "end": 1,
                                                                             "batch_size": 1, "max_length": 8},
                                         "t": []})], ErrorCode.BAD_REQUEST),
    "unknown field": ([_good_header(b={"evil": 1})], ErrorCode.BAD_REQUEST),
    "missing field": ([msgpack.packb({"v": 1, "k": "close", "id": 3, "b": {}, "t": []})], ErrorCode.BAD_REQUEST),
    "bad reply codec": ([_good_header(rc=["pickle", None])], ErrorCode.BAD_HEADER),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=str)
def test_malformed_request_gets_its_error_code_and_server_keeps_serving(server, raw, case):
    frames, code = MALFORMED[case]
    raw.send_multipart(frames)
    _, reply = _reply(raw)
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == code, reply.message
    assert reply.message
    assert isinstance(call(server, Ping()), Pong)


def test_oversized_message_is_refused(raw, server):
    frames = _forward_frames(spec=["float32", [20 << 20], "raw", "float32"], frame=b"\0" * (80 << 20))
    raw.send_multipart(frames)
    _, reply = _reply(raw)
    assert reply.code == ErrorCode.TOO_LARGE
    assert isinstance(call(server, Ping()), Pong)


def test_client_raises_typed_error_naming_worker(server):
    with pytest.raises(RemoteError) as e:
        call(server, REGISTRY["close"]("nope"))
    assert e.value.peer == server.endpoint and e.value.code == ErrorCode.INTERNAL


def test_timeout_is_explicit():
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        bus = BusLoop.get()

        async def go():
            conn = Connection(f"tcp://127.0.0.1:{port}", bus.context)
            try:
                return await conn.request(Ping(), timeout=0.3)
            finally:
                await conn.close()

        with pytest.raises(RequestTimeout) as e:
            bus.run(go())
        assert e.value.code == ErrorCode.TIMEOUT
    finally:
        silent.close(0)


def test_a_pool_closes_lost_connections_to_workers_gone_and_remembers_them_lost():
    """A worker that left: its lost, idle connection is closed unless kept; asked for again, the endpoint fails at
    once (not at the request's timeout) until a worker answers there again. Live connections stay."""
    import asyncio
    import time

    gone, alive = EchoServer(), EchoServer()
    endpoint = gone.endpoint

    async def wait_for(predicate):
        for _ in range(200):
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return False

    async def go(pool):
        for e in (endpoint, alive.endpoint):
            assert isinstance(await pool.get(e).request(Ping(), 5), Pong)
        gone.close()
        assert await wait_for(lambda: pool.get(endpoint).connected is False)
        await pool.prune(keep=[endpoint])
        assert endpoint in pool  # kept: the view still names it
        await pool.prune(keep=[])
        assert endpoint not in pool and alive.endpoint in pool
        started = time.monotonic()
        with pytest.raises(RemoteError) as e:
            await pool.get(endpoint).request(Ping(), 10)
        assert e.value.code == ErrorCode.UNREACHABLE and time.monotonic() - started < 1
        back = EchoServer(endpoint=endpoint)
        try:
            assert await wait_for(lambda: pool.get(endpoint).connected)
            return await pool.get(endpoint).request(Ping(), 5)
        finally:
            back.close()

    try:
        assert isinstance(on_bus(go), Pong)
    finally:
        alive.close()


def test_concurrent_requests_from_several_clients_are_never_mixed(server):
    bus = BusLoop.get()
    errors = []

    def client(seed):
        async def go():
            conn = Connection(server.endpoint, bus.context)
            try:
                import asyncio
                tensors = [torch.full((3, 5), float(seed * 1000 + i)) for i in range(50)]
                replies = await asyncio.gather(*(conn.request(Forward(t, 0, 1), 10.0) for t in tensors))
                for t, r in zip(tensors, replies):
                    if not torch.equal(t, r.hidden):
                        errors.append((seed, t[0, 0].item(), r.hidden[0, 0].item()))
            finally:
                await conn.close()
        bus.run(go())

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


_json_like = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                          | st.text(max_size=12) | st.binary(max_size=12),
                          lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
                          max_leaves=12)
_spec = st.one_of(st.none(), _json_like,
                  st.tuples(st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "x"]),
                            st.lists(st.integers(-3, 70), max_size=4),
                            st.sampled_from(["raw", "lz4", "int8", "bogus"]),
                            st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", None])).map(list))
_header = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, "1", None]), "k": st.sampled_from(list(REGISTRY) + ["nope", 3]),
     "id": st.integers(0, 2**31), "b": st.one_of(st.dictionaries(st.sampled_from(
         ["session_id", "start", "end", "batch_size", "max_length", "position", "adapter", "code", "x"]),
         _json_like, max_size=6), _json_like),
     "t": st.lists(_spec, max_size=5)})
_frames = st.one_of(
    st.tuples(_header.map(msgpack.packb), st.lists(st.binary(max_size=300), max_size=5)).map(lambda x: [x[0], *x[1]]),
    st.lists(st.binary(max_size=200), min_size=1, max_size=4))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=_frames)
def test_random_malformed_frames_never_crash_the_server(server, raw, frames):
    raw.send_multipart(frames)
    reply = raw.recv_multipart()  # every request is answered; RCVTIMEO fails the test otherwise
    env = wire.decode(reply)
    assert isinstance(env.message, (ErrorReply, HiddenReply, Pong)), env.message
