"""Hostile and malformed requests against a live worker process: every one answered with an error code,
nothing crashes, and the worker still generates correctly afterwards."""
from __future__ import annotations

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla import AutoDistributedModelForCausalLM
from corolla.bus import wire
from corolla.bus.errors import ErrorCode
from corolla.bus.messages import (Backward, CloseSession, ErrorReply, Forward, GradsReply, HiddenReply, InfoRequest,
                                  OpenSession, Ping, Pong, Step, WorkerInfo, Ack)
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args
from tests.test_bus import _frames as malformed_frames

pytestmark = pytest.mark.slow
HIDDEN = 64
KNOWN_CODES = {str(c) for c in ErrorCode}
VALID_REPLIES = (ErrorReply, HiddenReply, GradsReply, Pong, Ack, WorkerInfo)


@pytest.fixture(scope="module")
def worker(tiny_llama_folder):
    args = worker_args(tiny_llama_folder, ["0:4"], "--cache-tokens", "256", "--max-length", "64",
                       "--max-batch-size", "4")
    with LocalSwarm(args) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def raw(worker):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(worker.endpoints[0])
    yield sock
    sock.close()


def _tensor(shape, kind):
    if kind == "int":
        return torch.randint(-5, 100, shape)
    t = torch.randn(shape)
    if kind == "nan" and t.numel():
        t.view(-1)[0] = float("nan")
    if kind == "inf" and t.numel():
        t.view(-1)[-1] = float("inf")
    if kind == "half":
        t = t.half()
    return t


_dims = st.integers(0, 6)
_shape = st.one_of(st.tuples(st.integers(0, 5), st.integers(0, 9), st.sampled_from([HIDDEN, HIDDEN, 63, 1])),
                   st.lists(_dims, max_size=4).map(tuple))
_kind = st.sampled_from(["ok", "ok", "int", "nan", "inf", "half"])
_hidden = st.tuples(_shape, _kind).map(lambda a: _tensor(*a))
_small = st.integers(-3, 70)
_aux = st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(0, 9)).map(lambda s: torch.randint(-2, 80, s)),
                 st.tuples(st.integers(0, 5), st.integers(0, 9)).map(lambda s: torch.randn(s)))
_sid = st.sampled_from(["s0", "s1", "nope", "", "x" * 200])
_adapter = st.sampled_from(["", "", "ghost"])

_semantic = st.one_of(
    st.builds(Forward, _hidden, _small, _small, _aux, _aux, st.none(), _adapter),
    st.builds(Backward, _hidden, _hidden, _small, _small, _aux, _aux, st.none(), _adapter),
    st.builds(OpenSession, _sid, _small, _small, st.integers(-1, 6), st.integers(-5, 200), _adapter),
    st.builds(Step, _sid, _hidden, _small, _aux, _aux, st.none()),
    st.builds(CloseSession, _sid),
    st.builds(Ping), st.builds(InfoRequest),
)
_cases = st.one_of(_semantic.map(lambda m: wire.encode(m, 1)), malformed_frames)


@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frames=_cases)
def test_hostile_requests_get_error_codes_and_crash_nothing(worker, raw, frames):
    raw.send_multipart(frames)
    env = wire.decode(raw.recv_multipart())  # an answer for every request (RCVTIMEO fails the test otherwise)
    assert isinstance(env.message, VALID_REPLIES), env.message
    if isinstance(env.message, ErrorReply):
        assert env.message.code in KNOWN_CODES and env.message.code != ErrorCode.INTERNAL, env.message
    assert worker.workers[0].process.poll() is None


def test_worker_still_generates_correctly_afterwards(worker, tiny_llama_folder):
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[3, 14, 15, 92]])
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=worker.endpoints,
                                                            wire_dtype=None)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False),
                       local.generate(ids, max_new_tokens=12, do_sample=False))
