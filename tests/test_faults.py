"""Workers fail mid-generation (killed, stalled, restarted); the client re-routes, replays, and the text is the same."""
from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from corolla import AutoDistributedModelForCausalLM
from corolla.worker.launcher import LocalSwarm, start_worker
from tests.conftest import worker_args

pytestmark = pytest.mark.slow
NEW_TOKENS = 64
PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35]])


class AfterTokens(BaseStreamer):
    """Runs `action` once generate() has produced `n` new tokens."""

    def __init__(self, n, action):
        self.n, self.action, self.seen = n, action, -1

    def put(self, value):
        self.seen += 1  # the first put is the prompt
        if self.seen == self.n:
            self.action()

    def end(self):
        pass


@pytest.fixture(scope="module")
def reference(tiny_llama_folder):
    from transformers import AutoModelForCausalLM
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    return local.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def _generate_with_fault(folder, swarm, fault, **client):
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.endpoints, wire_dtype=None,
                                                            **client)
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             streamer=AfterTokens(10, lambda: fault(session)))
    return out, session


def _worker_of_first_hop(swarm, session):
    endpoint = session._hops[0].endpoint
    return next(w for w in swarm.workers if w.endpoint == endpoint)


def test_kill_9_one_worker_of_three(tiny_llama_folder, reference):
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4", "0:2"])) as swarm:
        killed = []

        def kill(session):
            worker = _worker_of_first_hop(swarm, session)
            worker.process.send_signal(signal.SIGKILL)
            killed.append(worker)

        out, session = _generate_with_fault(tiny_llama_folder, swarm, kill)
    assert killed and session.recoveries >= 1
    assert torch.equal(out, reference)


def test_stalled_worker_sigstop(tiny_llama_folder, reference):
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4", "0:2"])) as swarm:
        stopped = []

        def stall(session):
            worker = _worker_of_first_hop(swarm, session)
            os.kill(worker.process.pid, signal.SIGSTOP)
            stopped.append(worker)

        try:
            out, session = _generate_with_fault(tiny_llama_folder, swarm, stall, request_timeout=2.0)
        finally:
            for worker in stopped:
                os.kill(worker.process.pid, signal.SIGCONT)
    assert stopped and session.recoveries >= 1
    assert torch.equal(out, reference)


def test_worker_restarted_on_same_span(tiny_llama_folder, reference):
    """The only worker of blocks 2:4 dies and comes back at the same address; the session rebuilds its cache there."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2"])) as swarm:
        second = start_worker(*worker_args(tiny_llama_folder, ["2:4"])[0], "--port", "0")
        port = second.endpoint.rsplit(":", 1)[1]
        swarm.workers.append(second)
        restarted = []

        def restart(session):
            victim = next(w for w in swarm.workers if w.endpoint == session._hops[-1].endpoint)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            restarted.append(start_worker(*worker_args(tiny_llama_folder, ["2:4"])[0], "--port", port))
            swarm.workers.append(restarted[-1])

        out, session = _generate_with_fault(tiny_llama_folder, swarm, restart)
    assert restarted and session.recoveries >= 1
    assert torch.equal(out, reference)


def _full_and_free_replicas(folder):
    """Two workers of all blocks: A announced far faster but with cache for 64 tokens only, B slow with plenty."""
    a = worker_args(folder, ["0:4"], "--cache-tokens", "64", "--throughput", "1000000", "--gossip-interval", "0.5")
    b = worker_args(folder, ["0:4"], "--throughput", "1", "--gossip-interval", "0.5")
    return a + b


def _generate(folder, peers, **client):
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=peers, wire_dtype=None, **client)
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:  # 70 tokens: more than A has
        out = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out, session


def test_sessions_route_around_a_worker_without_cache_for_them(tiny_llama_folder, reference):
    """Gossip carries each worker's free cache: a session's chain skips the fastest worker when its cache cannot
    hold the session, instead of being refused there again and again."""
    with LocalSwarm(_full_and_free_replicas(tiny_llama_folder)) as swarm:
        out, session = _generate(tiny_llama_folder, swarm.endpoints)
    assert torch.equal(out, reference)
    assert session.chain == [(swarm.endpoints[1], 0, 4)] and session.recoveries == 0


def test_a_worker_that_refuses_a_session_for_want_of_cache_is_routed_around(tiny_llama_folder, reference, caplog):
    """A static chain knows no worker's free cache: the full worker's refusal (CACHE_FULL) sends the session to the
    replica at once (no back-off: another worker serves those blocks) rather than back to the full worker until
    the retries run out."""
    with LocalSwarm(_full_and_free_replicas(tiny_llama_folder)) as swarm, \
            caplog.at_level(logging.INFO, logger="corolla.client.faults"):
        out, session = _generate(tiny_llama_folder, swarm.endpoints, routing="static")
    assert torch.equal(out, reference)
    assert session.chain == [(swarm.endpoints[1], 0, 4)]
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries and all(m.endswith("retrying in 0.00 s") for m in retries), retries


def test_a_session_longer_than_a_worker_takes_goes_to_one_that_takes_it(tiny_llama_folder, reference):
    """Gossip carries each worker's session limits: the fastest worker opens sessions of 32 tokens at most, so a
    70-token session goes to the replica (the fast one would refuse it as a bad request, which is not retried)."""
    args = (worker_args(tiny_llama_folder, ["0:4"], "--max-length", "32", "--throughput", "1000000")
            + worker_args(tiny_llama_folder, ["0:4"], "--throughput", "1"))
    with LocalSwarm(args) as swarm:
        out, session = _generate(tiny_llama_folder, swarm.endpoints)
    assert torch.equal(out, reference)
    assert session.chain == [(swarm.endpoints[1], 0, 4)]
