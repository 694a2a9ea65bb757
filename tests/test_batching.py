"""Decode steps of different sessions queued together run as one pass, with each session's own tokens."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
import torch

from corolla.bus.client import BusLoop, Connection
from corolla.bus.errors import ErrorCode, RemoteError
from corolla.bus.messages import CloseSession, InfoRequest, OpenSession, Step
from corolla.worker.compute import PRIORITY_INFERENCE, PriorityExecutor
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args

PROMPTS = ["A cat", "The capital of France is", "Once upon a time, in a land far away, there lived",
           "1, 2, 3,"]
NEW_TOKENS = 4
BLOCKER_TOKENS = 128  # a prefill that keeps the compute thread busy while the decode steps arrive behind it


def test_compute_thread_takes_queued_jobs_of_a_group_together():
    """Queued jobs of one group join the first (up to the limit); one owner's jobs never overtake each other."""
    calls: list[list[str]] = []
    gate = threading.Event()

    def batch(items):
        calls.append(list(items))
        return [(item, None) for item in items]

    async def go():
        executor = PriorityExecutor(max_batch=3)
        try:
            blocked = executor.submit(PRIORITY_INFERENCE, gate.wait, 30)
            jobs = [("a1", "g", "a"), ("x1", None, "x"), ("b1", "g", "b"), ("x2", "g", "x"), ("a2", "g", "a"),
                    ("c1", "g", "c"), ("d1", "g", "d"), ("e1", "h", "e")]
            futures = [executor.submit_batched(PRIORITY_INFERENCE, batch, name, group, owner)
                       for name, group, owner in jobs]
            gate.set()
            await blocked
            assert await asyncio.gather(*futures) == [name for name, _, _ in jobs]
        finally:
            executor.shutdown()

    asyncio.run(go())
    # x2 waits behind x1 (which runs alone), a2 behind a1; c1 fills the batch of 3; e1 is of another group
    assert calls == [["a1", "b1", "c1"], ["x1"], ["x2", "a2", "d1"], ["e1"]]


@pytest.fixture(scope="module")
def workers(smollm_folder, tmp_path_factory):
    """Two workers of SmolLM2's whole span: batching on (the default) and off."""
    off = tmp_path_factory.mktemp("batching") / "off.yaml"
    off.write_text("max_decode_batch: 1\n")
    args = worker_args(smollm_folder, ["0:30"]) + worker_args(smollm_folder, ["0:30"], "--config", str(off))
    with LocalSwarm(args) as swarm:
        yield dict(zip(("on", "off"), swarm.endpoints))


@dataclass
class Greedy:
    """One session decoding greedily over raw steps; the local model embeds and picks tokens."""

    session_id: str
    ids: torch.Tensor  # [batch, tokens so far]
    mask: torch.Tensor | None = None  # left padding, as a tokenizer pads a batch
    position: int = 0  # tokens in the worker's cache

    def step(self, model, hidden: torch.Tensor | None = None, position: int | None = None) -> Step:
        new = self.ids[:, self.position:]
        hidden = model.model.embed_tokens(new) if hidden is None else hidden
        position = self.position if position is None else position
        if self.mask is None:
            return Step(self.session_id, hidden, position)
        position_ids = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        return Step(self.session_id, hidden, position, attention_mask=self.mask[:, self.position:],
                    position_ids=position_ids[:, self.position:])

    def take(self, model, out: torch.Tensor) -> None:
        token = model.lm_head(model.model.norm(out[:, -1:])).argmax(-1)
        self.position = self.ids.shape[1]
        self.ids = torch.cat([self.ids, token], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(token)], dim=1)


class Client:
    """Many requests in flight on one connection, from the bus loop: the worker receives them back to back."""

    def __init__(self, endpoint: str):
        self.bus = BusLoop.get()
        self.conn = Connection(endpoint, self.bus.context)

    def __call__(self, *messages, errors: bool = False) -> list:
        async def go():
            return await asyncio.gather(*(self.conn.request(m, 120.0) for m in messages), return_exceptions=errors)
        return self.bus.run(go())

    def counters(self) -> tuple[int, int]:
        extra = self(InfoRequest())[0].extra
        return extra["batched_steps"], extra["decode_batches"]

    def blocker(self, model, session_id: str) -> Step:
        """A long prefill of a session of its own: the steps sent right after it queue up behind it."""
        self(OpenSession(session_id, 0, 30, 1, BLOCKER_TOKENS))
        return Step(session_id, torch.randn(1, BLOCKER_TOKENS, model.config.hidden_size) * 0.1, 0)

    def close(self, session_ids) -> None:
        self(*(CloseSession(s) for s in session_ids))
        self.bus.run(self.conn.close())


def _open_and_prefill(client: Client, model, sessions: list[Greedy]) -> None:
    client(*(OpenSession(s.session_id, 0, 30, s.ids.shape[0], 64) for s in sessions))
    for s, reply in zip(sessions, client(*(s.step(model) for s in sessions))):
        s.take(model, reply.hidden)


def _decode(client: Client, model, sessions: list[Greedy], rounds: int) -> None:
    for _ in range(rounds):
        for s, reply in zip(sessions, client(*(s.step(model) for s in sessions))):
            s.take(model, reply.hidden)


@pytest.fixture(scope="module")
def alone(smollm_local, smollm_tokenizer):
    """The local model's greedy tokens for each prompt alone, and for the first two as one left-padded batch."""
    smollm_tokenizer.padding_side = "left"

    def generate(prompts):
        batch = smollm_tokenizer(prompts, return_tensors="pt", padding=True)
        return smollm_local.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=smollm_tokenizer.eos_token_id)

    return {**{p: generate([p]) for p in PROMPTS}, "padded": generate(PROMPTS[:2])}


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["on", "off"])
def test_concurrent_sessions_give_their_solo_tokens(workers, smollm_local, smollm_tokenizer, alone, batching):
    client = Client(workers[batching])
    model = smollm_local
    sessions = [Greedy(f"{batching}-{i}", smollm_tokenizer(p, return_tensors="pt").input_ids)
                for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        _open_and_prefill(client, model, sessions)
        before = client.counters()
        replies = client(client.blocker(model, f"{batching}-blocker"), *(s.step(model) for s in sessions))
        for s, reply in zip(sessions, replies[1:]):
            s.take(model, reply.hidden)
        after = client.counters()
        _decode(client, model, sessions, NEW_TOKENS - 2)
        for s, prompt in zip(sessions, PROMPTS):
            assert torch.equal(s.ids, alone[prompt]), prompt
    client.close([f"{batching}-blocker", *(s.session_id for s in sessions)])
    if batching == "on":
        assert (after[0] - before[0], after[1] - before[1]) == (len(PROMPTS), 1)
    else:
        assert after == before == (0, 0)


@pytest.mark.slow
def test_padded_sessions_of_different_lengths_share_passes(workers, smollm_local, smollm_tokenizer, alone):
    """A left-padded batch-2 session keeps its mask and positions beside batch-1 sessions of other lengths."""
    client = Client(workers["on"])
    model = smollm_local
    padded = smollm_tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    assert (padded.attention_mask == 0).any()
    sessions = [Greedy("pad-0", padded.input_ids, padded.attention_mask),
                Greedy("pad-1", smollm_tokenizer(PROMPTS[2], return_tensors="pt").input_ids),
                Greedy("pad-2", smollm_tokenizer(PROMPTS[3], return_tensors="pt").input_ids)]
    with torch.no_grad():
        _open_and_prefill(client, model, sessions)
        before = client.counters()
        replies = client(client.blocker(model, "pad-blocker"), *(s.step(model) for s in sessions))
        for s, reply in zip(sessions, replies[1:]):
            s.take(model, reply.hidden)
        after = client.counters()
        _decode(client, model, sessions, NEW_TOKENS - 2)
        assert torch.equal(sessions[0].ids, alone["padded"])
        for s, prompt in zip(sessions[1:], PROMPTS[2:]):
            assert torch.equal(s.ids, alone[prompt]), prompt
    client.close(["pad-blocker", *(s.session_id for s in sessions)])
    assert (after[0] - before[0], after[1] - before[1]) == (len(sessions), 1)


@pytest.mark.slow
def test_a_bad_step_fails_alone_and_leaves_its_session_intact(workers, smollm_local, smollm_tokenizer, alone):
    client = Client(workers["on"])
    model = smollm_local
    sessions = [Greedy(f"bad-{i}", smollm_tokenizer(p, return_tensors="pt").input_ids) for i, p in enumerate(PROMPTS)]
    with torch.no_grad():
        _open_and_prefill(client, model, sessions)
        before = client.counters()
        nan = torch.full((1, 1, model.config.hidden_size), float("nan"))
        bad = [sessions[0].step(model, hidden=nan), sessions[1].step(model, position=sessions[1].position + 5)]
        good = [s.step(model) for s in sessions[2:]]
        replies = client(client.blocker(model, "bad-blocker"), *bad, *good, errors=True)
        assert [r.code if isinstance(r, RemoteError) else None for r in replies[1:]] == \
               [ErrorCode.BAD_VALUE, ErrorCode.OUT_OF_RANGE, None, None]
        for s, reply in zip(sessions[2:], replies[3:]):
            s.take(model, reply.hidden)
        after = client.counters()
        for s, reply in zip(sessions[:2], client(*(s.step(model) for s in sessions[:2]))):  # sent again, right
            s.take(model, reply.hidden)
        _decode(client, model, sessions, NEW_TOKENS - 2)
        for s, prompt in zip(sessions, PROMPTS):
            assert torch.equal(s.ids, alone[prompt]), prompt
    client.close(["bad-blocker", *(s.session_id for s in sessions)])
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)


@pytest.mark.slow
def test_sessions_on_the_tail_of_the_span_are_batched_too(workers, smollm_local):
    """Sessions of blocks 15:30 (a chain using the tail of these workers' spans) share passes, and their outputs
    equal those of the worker that steps them one by one."""
    hidden = smollm_local.config.hidden_size
    lengths = [3, 9, 6]
    prompts = [torch.randn(1, n, hidden) * 0.1 for n in lengths]
    decode = [torch.randn(1, 2, hidden) * 0.1 for _ in lengths]
    outputs, counted = {}, {}
    for mode in ("on", "off"):
        client = Client(workers[mode])
        ids = [f"tail-{mode}-{i}" for i in range(len(lengths))]
        client(*(OpenSession(s, 15, 30, 1, 32) for s in ids))
        client(*(Step(s, p, 0) for s, p in zip(ids, prompts)))
        before = client.counters()
        outs = []
        for k in range(2):
            replies = client(client.blocker(smollm_local, f"tail-{mode}-blocker-{k}"),
                             *(Step(s, d[:, k:k + 1], n + k) for s, d, n in zip(ids, decode, lengths)))
            outs.append(torch.cat([r.hidden for r in replies[1:]]))
        counted[mode] = tuple(a - b for a, b in zip(client.counters(), before))
        outputs[mode] = torch.cat(outs, dim=1)
        client.close([*ids, f"tail-{mode}-blocker-0", f"tail-{mode}-blocker-1"])
    assert counted == {"on": (2 * len(lengths), 2), "off": (0, 0)}
    assert (outputs["on"] - outputs["off"]).abs().max() / outputs["off"].abs().max() < 1e-5  # float32, padded


@pytest.mark.slow
def test_benchmark_sessions_in_processes_of_their_own(tmp_path):
    """perf/bench_batching.py --gpu's sessions, each a client process, all starting at once: here on the CPU with its
    smallest shape, so the script's protocol (ready, go, token times) is checked where CI runs."""
    from perf import bench_batching

    results: dict = {}
    with LocalSwarm(bench_batching.gpu_workers("tiny", "none", str(tmp_path))) as swarm:
        before = bench_batching.worker_counts(swarm.endpoints)
        figures = bench_batching.run_session_processes("tiny", swarm.endpoints, tmp_path.name, 3, 5)
        bench_batching.note(results, "on", 3, figures, swarm.endpoints, before, 5)
    # sessions that ran one after another would give the same tokens/s in all as each gives alone
    assert figures["aggregate_tok_s"] > 1.2 * figures["session_steps_s"] > 0
    assert 0 <= results["on"][3]["batched"] <= 1
