"""Micro-batches in flight along the chain give what one whole batch gives, locally or through the swarm."""
from __future__ import annotations

import signal
import time

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.bus.messages import Backward, Forward
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args

pytestmark = pytest.mark.slow
PRE = 3
BLOCKS = 4


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class Recorder:
    """Every hop request the client sends: worker, kind, rows, and when it left and its answer came back.

    `before(hop, message)` runs just before a request leaves (a test kills a worker there)."""

    def __init__(self, monkeypatch, remote, before=None):
        self.calls = []
        call = remote._call

        async def recorded(hop, message, retry):
            if before is not None:
                before(hop, message)
            sent = time.perf_counter()
            try:
                return await call(hop, message, retry)
            finally:
                self.calls.append((hop.start, type(message), message.hidden.shape[0], sent, time.perf_counter()))

        monkeypatch.setattr(remote, "_call", recorded)

    def rows(self, first_block, kind):
        return [rows for start, k, rows, _, _ in self.calls if start == first_block and k is kind]

    def spans(self, first_block, kind):
        return [(sent, done) for start, k, _, sent, done in self.calls if start == first_block and k is kind]


@pytest.fixture(scope="module")
def swarm(tiny_llama_folder):
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4"])) as s:
        yield s


@pytest.fixture(scope="module")
def local(tiny_llama_folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval().requires_grad_(False)


def _model(folder, swarm, micro_batches, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.endpoints, wire_dtype=None,
                                                           micro_batches=micro_batches, **kwargs)


def _batch(rows=8, length=24):
    """Token ids and a left-padded attention mask: row i starts with i % 4 padding tokens."""
    ids = torch.randint(0, 512, (rows, length), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones(rows, length, dtype=torch.long)
    for i in range(rows):
        mask[i, :i % 4] = 0
    return ids, mask


def _loss(logits, mask):
    """Weights every real token's logits differently, so each row's and position's gradient is distinct."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    return (logits * weights * mask.unsqueeze(-1)).sum()


def _embedding_grads(model, ids, mask):
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    _loss(logits, mask).backward()
    return logits.detach() * mask.unsqueeze(-1), embeds.grad


def test_pipelined_equals_unpipelined_and_local_with_padding(tiny_llama_folder, swarm, local, monkeypatch):
    ids, mask = _batch()
    off = _model(tiny_llama_folder, swarm, 1)
    on = _model(tiny_llama_folder, swarm, 4)
    seen = Recorder(monkeypatch, on.remote_layers)
    logits, grads = _embedding_grads(on, ids, mask)
    assert seen.rows(0, Forward) == seen.rows(2, Forward) == [2, 2, 2, 2]
    assert seen.rows(0, Backward) == seen.rows(2, Backward) == [2, 2, 2, 2]
    want_logits, want_grads = _embedding_grads(off, ids, mask)
    assert _rel(logits, want_logits) < 1e-5 and _rel(grads, want_grads) < 1e-5
    local_logits, local_grads = _embedding_grads(local, ids, mask)
    assert _rel(logits, local_logits) < 1e-5 and _rel(grads, local_grads) < 1e-5


def _local_deep_prompted(local, ids, prompts, deep):
    """Reference: prompts prepended, deep prompts added to the prefix by hooks before each block."""
    embeds = torch.cat([prompts.unsqueeze(0).expand(ids.shape[0], -1, -1), local.model.embed_tokens(ids)], dim=1)

    def adder(i):
        def add(module, args, kwargs):
            h = args[0]
            return (torch.cat([h[:, :PRE] + deep[i], h[:, PRE:]], dim=1), *args[1:]), kwargs
        return add

    hooks = [layer.register_forward_pre_hook(adder(i), with_kwargs=True) for i, layer in enumerate(local.model.layers)]
    try:
        return local(inputs_embeds=embeds).logits[:, PRE:]
    finally:
        for h in hooks:
            h.remove()


def test_shared_deep_prompt_gradients_are_summed_over_micro_batches(tiny_llama_folder, swarm, local):
    ids, mask = _batch(6, 16)
    ones = torch.ones_like(mask)
    grads = {}
    for micro_batches in (1, 3):
        model = _model(tiny_llama_folder, swarm, micro_batches, tuning_mode="deep_ptune", pre_seq_len=PRE)
        inner = model.model
        torch.manual_seed(5)
        torch.nn.init.normal_(inner.prompt_embeddings.weight, std=0.02)
        torch.nn.init.normal_(inner.deep_prompt_embeddings.weight, std=0.02)
        _loss(model(ids).logits, ones).backward()
        grads[micro_batches] = (inner.prompt_embeddings.weight.grad, inner.deep_prompt_embeddings.weight.grad)
    for got, want in zip(grads[3], grads[1]):
        assert _rel(got, want) < 1e-5

    prompts = inner.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep = inner.deep_prompt_embeddings.weight.detach().view(PRE, BLOCKS, -1).permute(1, 0, 2).clone()
    deep.requires_grad_(True)
    _loss(_local_deep_prompted(local, ids, prompts, deep), ones).backward()
    assert _rel(grads[3][0], prompts.grad) < 1e-5
    assert _rel(grads[3][1].view(PRE, BLOCKS, -1).permute(1, 0, 2), deep.grad) < 1e-5


def test_per_row_deep_prompts_are_split_with_their_rows(tiny_llama_folder, swarm):
    """Prompts with one row per batch row travel with their micro-batch; their gradients come back in order."""
    hidden = torch.randn(5, 12, 64, generator=torch.Generator().manual_seed(2))
    prompts = 0.1 * torch.randn(BLOCKS, 5, PRE, 64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(5, 12, 64, generator=torch.Generator().manual_seed(4))
    results = []
    for micro_batches in (1, 2):
        model = _model(tiny_llama_folder, swarm, micro_batches)  # kept: discovery stops with the model
        h, p = hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
        out = model.remote_layers(h, None, None, p)
        (out * weights).sum().backward()
        results.append((out.detach(), h.grad, p.grad))
    for got, want in zip(results[1], results[0]):
        assert _rel(got, want) < 1e-5


def test_off_sends_one_request_per_hop(tiny_llama_folder, swarm, monkeypatch):
    ids, mask = _batch()
    model = _model(tiny_llama_folder, swarm, 1)
    seen = Recorder(monkeypatch, model.remote_layers)
    _embedding_grads(model, ids, mask)
    for first_block in (0, 2):
        assert seen.rows(first_block, Forward) == seen.rows(first_block, Backward) == [8]
    # one whole batch goes hop by hop: the second hop starts only once the first has answered
    assert seen.spans(2, Forward)[0][0] >= seen.spans(0, Forward)[0][1]


def test_micro_batches_are_in_flight_at_once(tiny_llama_folder, swarm, monkeypatch):
    """Automatic: 16 rows of 128 tokens over 2 hops make 4 micro-batches; while the first hop still works on
    some, the second already has others, forward and backward."""
    ids = torch.randint(0, 512, (16, 128), generator=torch.Generator().manual_seed(0))
    model = _model(tiny_llama_folder, swarm, None)
    seen = Recorder(monkeypatch, model.remote_layers)
    _embedding_grads(model, ids, torch.ones_like(ids))
    for first_block in (0, 2):
        assert seen.rows(first_block, Forward) == seen.rows(first_block, Backward) == [4, 4, 4, 4]

    def overlap(a, b):
        return any(s1 < d2 and s2 < d1 for s1, d1 in a for s2, d2 in b)

    assert overlap(seen.spans(0, Forward), seen.spans(2, Forward))
    assert overlap(seen.spans(2, Backward), seen.spans(0, Backward))
    seen.calls.clear()
    _embedding_grads(model, ids[:1], torch.ones_like(ids[:1]))  # a single row is never split
    assert seen.rows(0, Forward) == seen.rows(2, Forward) == [1]


@pytest.mark.parametrize("kind", [Forward, Backward])
def test_worker_killed_mid_pass_with_a_replica(tiny_llama_folder, local, monkeypatch, kind):
    """The worker of blocks 2:4 dies as the second micro-batch is about to reach it; those it had re-route to
    the replica, the first hop's finished work is kept, and the result is still exact."""
    ids, mask = _batch()
    want_logits, want_grads = _embedding_grads(local, ids, mask)
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4", "2:4"])) as swarm:
        model = _model(tiny_llama_folder, swarm, 4)
        killed, sent = [], []

        def kill_on_second(hop, message):
            if hop.start == 2 and isinstance(message, kind):
                sent.append(hop.endpoint)
                if len(sent) == 2 and not killed:
                    worker = next(w for w in swarm.workers if w.endpoint == hop.endpoint)
                    worker.process.send_signal(signal.SIGKILL)
                    worker.process.wait()
                    killed.append(worker.endpoint)

        seen = Recorder(monkeypatch, model.remote_layers, kill_on_second)
        logits, grads = _embedding_grads(model, ids, mask)
    assert killed and killed[0] != sent[-1]  # the later micro-batches went to the replica
    assert seen.rows(0, kind) == [2, 2, 2, 2]  # no micro-batch went through the first hop twice
    assert _rel(logits, want_logits) < 1e-5 and _rel(grads, want_grads) < 1e-5
