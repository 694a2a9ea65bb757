"""The slot pool GPU workers batch their sessions' decode steps with (worker/slots.py), run eagerly here: any set
of its sessions stepping in one pass computes what each session computes alone, and the pool's slots are
accounted in the worker's cache budget. On a GPU, real workers check the captured graphs of the same passes
against graphs of one session each."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import DynamicCache

from corolla.bus.errors import ErrorCode, RemoteError
from corolla.bus.messages import CloseSession, InfoRequest, OpenSession, Step
from corolla.bus.server import RequestError
from corolla.bus.wire import Envelope
from corolla.worker.compute import PRIORITY_INFERENCE
from corolla.worker.config import WorkerConfig
from corolla.worker.kv_cache import Session, SessionTable
from corolla.worker.launcher import LocalSwarm
from corolla.worker.random_weights import random_span
from corolla.worker.service import WorkerService
from corolla.worker.slots import SlotPool, SlotRow, _bucket, slot_length, span_step
from tests.conftest import worker_args
from tests.test_batching import Client
from tests.test_gpu_paths import HIDDEN, tiny_config

SLOTS, LENGTH = 4, 32


def make_pool(span, length: int = LENGTH) -> SlotPool:
    config = span.span_config
    return SlotPool(span_step(span), len(span.layers), SLOTS, length, config.num_key_value_heads,
                    HIDDEN // config.num_attention_heads, HIDDEN, torch.float32, torch.device("cpu"))


@pytest.fixture
def span():
    return random_span(tiny_config(), 0, 4, torch.float32, "cpu", seed=5)


class Pair:
    """One session in the pool and the same session alone on a DynamicCache, fed the same tokens."""

    def __init__(self, span, pool, prompt_length: int):
        self.span, self.cache = span, pool.acquire()
        self.reference = DynamicCache(config=span.span_config)
        self.position = 0
        self.prefill(torch.randn(1, prompt_length, HIDDEN))

    def prefill(self, hidden: torch.Tensor) -> None:
        """An eager step of several tokens on the session's own slot; checks it against the reference."""
        positions = torch.arange(self.position, self.position + hidden.shape[1])[None]
        got = self.span(hidden, position_ids=positions, cache=self.cache.at(self.position))
        assert (got - self.alone(hidden, positions)).abs().max() < 1e-5
        self.position += hidden.shape[1]

    def alone(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra = self.reference.get_seq_length() - self.position
        if extra > 0:
            self.reference.crop(-extra)
        return self.span(hidden, position_ids=positions, cache=self.reference)

    def row(self) -> tuple[SlotRow, torch.Tensor]:
        """This session's next single-token step, and what it computes alone."""
        hidden = torch.randn(1, 1, HIDDEN)
        want = self.alone(hidden, torch.tensor([[self.position]]))
        return SlotRow(self.cache.slot, self.position, hidden, None), want


def step_together(pool: SlotPool, pairs: list[Pair]) -> None:
    rows, wants = zip(*(p.row() for p in pairs))
    for got, want, pair in zip(pool.run(list(rows)), wants, pairs):
        assert (got - want).abs().max() < 1e-5
        pair.position += 1


@pytest.mark.parametrize("length", [128, 24])  # 128: passes attend over its first 64 tokens; 24: over all
def test_any_set_of_sessions_steps_in_one_pass_as_each_does_alone(span, length):
    pool = make_pool(span, length)
    with torch.inference_mode():
        a, b, c = (Pair(span, pool, n) for n in (3, 9, 5))
        assert [p.cache.slot for p in (a, b, c)] == [0, 1, 2]
        step_together(pool, [a, b, c])
        step_together(pool, [a, c])  # b's slot rides along idle: its cache must come out untouched
        step_together(pool, [b])
        step_together(pool, [c])  # a pass of 4 rows: slots 0, 1 and the free slot 3 idle
        c.prefill(torch.randn(1, 4, HIDDEN))  # an eager step after pool passes starts at the session's position
        step_together(pool, [c, b, a])
        b.position -= 2  # the client re-sends from an earlier position: the worker just steps from there
        step_together(pool, [b])
        step_together(pool, [a, b, c])


def test_passes_attend_over_power_of_two_buckets():
    assert [_bucket(n, 16) for n in (1, 2, 3, 5, 9, 16, 40)] == [1, 2, 4, 8, 16, 16, 16]
    assert [_bucket(n, 1024, 64) for n in (1, 64, 65, 1000, 5000)] == [64, 64, 128, 1024, 1024]
    assert [_bucket(n, 3000, 64) for n in (2048, 2049, 3000)] == [2048, 3000, 3000]  # the last, up to the slot's end


def test_slots_are_taken_lowest_first_and_come_back(span):
    pool = make_pool(span)
    caches = [pool.acquire() for _ in range(SLOTS)]
    assert [c.slot for c in caches] == list(range(SLOTS)) and pool.acquire() is None
    caches[1].release()
    caches[1].release()  # twice: still one free slot
    assert pool.free_slots == 1 and pool.acquire().slot == 1


def test_slots_hold_the_longest_session_within_half_the_budget():
    assert slot_length(max_length=8192, cache_tokens=32768, slots=16) == 1024
    assert slot_length(max_length=4096, cache_tokens=262144, slots=16) == 4096
    assert slot_length(max_length=3000, cache_tokens=1 << 20, slots=8) == 3000
    assert slot_length(max_length=8192, cache_tokens=2048, slots=16) == 0  # slots too short: no pool


def test_pooled_sessions_reserve_nothing_beyond_the_pool(span):
    pool = make_pool(span)  # 4 x 32 tokens carved out of the budget
    table = SessionTable(budget_tokens=200, idle_timeout=60, pool=pool)
    assert table.free_tokens == 200
    table.open(Session("pooled", 0, 4, 1, 20, cache=pool.acquire()))
    assert table.free_tokens == 200 - LENGTH
    table.open(Session("private", 0, 4, 2, 30, cache=None))
    assert table.free_tokens == 200 - LENGTH - 60
    with pytest.raises(RequestError) as e:  # 72 - 60 = 12 private tokens left, whatever the free slots
        table.open(Session("big", 0, 4, 1, 13, cache=None))
    assert e.value.code == ErrorCode.CACHE_FULL
    table.close("pooled")
    assert pool.free_slots == SLOTS and table.free_tokens == 200 - 60


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization, dtype, tolerance", [("none", "float32", 1e-4), ("nf4", "bfloat16", 5e-2),
                                                            ("int8", "bfloat16", 0)])
def test_gpu_workers_step_pooled_sessions_as_one_graph_replay(tmp_path, quantization, dtype, tolerance):
    """Real GPU workers: with the pool (the default) concurrent sessions' steps run as shared graph replays, and give
    what a worker replaying each session's own graph gives; a bad step still fails alone. nf4: a pass of several rows
    runs bitsandbytes' product where one row runs Corolla's kernel, which rounds otherwise. int8 workers have no pool:
their sessions replay graphs of their own, as with it off."""
    tiny_config().save_pretrained(tmp_path)
    off = tmp_path / "off.yaml"
    off.write_text("max_decode_batch: 1\n")
    common = ("--random-weights", "--seed", "4", "--device", "cuda:0", "--quantization", quantization,
              "--dtype", dtype)
    lengths = [3, 9, 6, 12]
    prompts = [torch.randn(1, n, HIDDEN) for n in lengths]
    decode = [torch.randn(1, 3, HIDDEN) for _ in lengths]
    nan = torch.full((1, 1, HIDDEN), float("nan"))
    outputs, counted = {}, {}
    args = worker_args(str(tmp_path), ["0:4"], *common) + worker_args(str(tmp_path), ["0:4"], *common, "--config", str(off))
    with LocalSwarm(args) as swarm:
        for mode, endpoint in zip(("on", "off"), swarm.endpoints):
            client = Client(endpoint)
            assert (client(InfoRequest())[0].extra["slots"] > 1) == (mode == "on" and quantization != "int8")
            ids = [f"{mode}-{i}" for i in range(len(lengths))]
            client(*(OpenSession(s, 0, 4, 1, 64) for s in ids))
            client(*(Step(s, p, 0) for s, p in zip(ids, prompts)))
            before, outs = client.counters(), []
            for k in range(3):
                steps = [Step(s, d[:, k:k + 1], n + k) for s, d, n in zip(ids, decode, lengths)]
                replies = client(Step(ids[0], nan, lengths[0] + k), *steps[1:], errors=True)
                assert isinstance(replies[0], RemoteError) and replies[0].code == ErrorCode.BAD_VALUE
                outs.append(torch.cat([client(steps[0])[0].hidden] + [r.hidden for r in replies[1:]]))
            counted[mode] = client.counters()[0] - before[0]
            outputs[mode] = torch.cat(outs, dim=1)
            client.close(ids)
    assert counted["off"] == 0 and (counted["on"] > 0) == (quantization != "int8")
    on, off_ = outputs["on"].float(), outputs["off"].float()
    assert (on - off_).abs().max() / off_.abs().max() <= tolerance


def test_a_worker_steps_its_pooled_sessions_together(span):
    """The worker's side of the pool, in process on the CPU (where workers have no pool, its passes run eagerly):
    queued steps of pooled sessions share one pass, a session too long for a slot keeps a cache of its own, a step
    re-sent from an earlier position and a prefill after pool passes compute what they do alone, and a closed
    session's slot is free again. The reference is a worker that steps every session alone."""
    service = WorkerService(span, WorkerConfig(model="tiny", max_length=64, cache_tokens=1000), "tiny", 4, 0, 4, HIDDEN)
    service.pool = make_pool(span)
    service.sessions = SessionTable(1000, 60, service.pool)
    alone = WorkerService(span, WorkerConfig(model="tiny", max_decode_batch=1), "tiny", 4, 0, 4, HIDDEN)
    ids, lengths = ["a", "b", "c", "long"], [3, 9, 6, 4]
    prompts = [torch.randn(1, n, HIDDEN) for n in lengths]
    decode = [torch.randn(1, 4, HIDDEN) for _ in lengths]

    async def steps(worker, messages):
        blocker = worker.compute.submit(PRIORITY_INFERENCE, time.sleep, 0.2)  # the steps queue up behind it
        replies = await asyncio.gather(*(worker.handle(Envelope(0, m)) for m in messages))
        await blocker
        return [r.hidden for r in replies]

    async def run(worker):
        for s, n in zip(ids, [LENGTH] * 3 + [LENGTH + 1]):
            await worker.handle(Envelope(0, OpenSession(s, 0, 4, 1, n)))
        outs = [await steps(worker, [Step(s, p, 0) for s, p in zip(ids, prompts)])]
        for k in range(3):
            outs.append(await steps(worker, [Step(s, d[:, k:k + 1], n + k) for s, d, n in zip(ids, decode, lengths)]))
        outs.append(await steps(worker, [Step("b", decode[1][:, :2], lengths[1] + 1),  # from an earlier position
                                         Step("c", decode[2][:, 3:], lengths[2] + 3)]))
        outs.append(await steps(worker, [Step("b", decode[1][:, 3:], lengths[1] + 3), Step("c", decode[2], 10)]))
        await worker.handle(Envelope(0, CloseSession("a")))
        return outs

    try:
        got, want = asyncio.run(run(service)), asyncio.run(run(alone))
        assert [service.sessions.get(s).pooled for s in ids[1:]] == [True, True, False]
        assert service.pool.free_slots == SLOTS - 2  # "a" gave its slot back
        assert (service.batched_steps, service.decode_batches) == (3 * 3, 3)
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert (a - b).abs().max() < 1e-5
    finally:
        service.close()
        alone.close()
