"""Block selection: gaps first, moves only when far better, one twin at a time, moves reuse loaded blocks."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from corolla.client.model import AutoDistributedModelForCausalLM
from corolla.worker.block_selection import MOVE_GAIN, block_throughputs, choose_start, plan_move
from corolla.worker.launcher import LocalSwarm, stop_all
from corolla.worker.loader import load_span
from corolla.worker.respan import respan

from tests.discovery_helpers import (WORKER_FLAGS, entry, free_port, pull_table, reference_tokens, save_tiny_llama,
                                     spans, wait_until)


@pytest.fixture(scope="module")
def thirty_blocks(tmp_path_factory):
    """A random 30-block llama of hidden size 32 (a unique folder name is its model id: no other test's swarm)."""
    return save_tiny_llama(tmp_path_factory.mktemp("blocks") / f"tiny30-{uuid.uuid4().hex[:8]}", 30, 32)


def test_new_workers_fill_gaps_then_the_weakest_stretch():
    assert choose_start(block_throughputs([], 30), 10) == 0
    served = block_throughputs([entry("a", 0, 10), entry("b", 20, 30)], 30)
    assert choose_start(served, 10) == 10
    assert choose_start(served, 5) == 10
    served = block_throughputs([entry("a", 0, 30, throughput=50), entry("b", 0, 12), entry("c", 22, 30)], 30)
    assert choose_start(served, 10) == 12  # 12:22 is served by `a` alone
    unknown = block_throughputs([entry("a", 0, 10, throughput=0), entry("b", 10, 30, throughput=7)], 30)
    assert list(unknown[:10]) == [7] * 10  # a worker announcing no throughput counts as the median


def test_moves_only_when_the_swarm_gets_far_better():
    a, b, c = entry("a", 0, 10), entry("b", 10, 20), entry("c", 20, 30)
    assert plan_move([a, b, c], a, 30) is None  # every block served once: moving would open a gap
    twin = entry("d", 0, 10)
    assert plan_move([a, twin, b], twin, 30) is None, "the twin with the smaller id moves first"
    assert plan_move([a, twin, b], a, 30) == 20
    # 0:10 twice, 10:20 and 20:30 once: a move just shifts the weakest block, no gain
    assert plan_move([a, twin, b, c], twin, 30) is None
    # 20:30 much weaker than 0:10 (served twice): the bottleneck doubles, >= MOVE_GAIN
    weak = entry("c", 20, 30, throughput=10)
    assert plan_move([a, twin, b, weak], a, 30) == 20
    slightly = entry("c", 20, 30, throughput=100 / (MOVE_GAIN - 0.2))
    assert plan_move([entry("a", 0, 10, throughput=20), entry("d", 0, 10, throughput=20), b, slightly],
                     entry("a", 0, 10, throughput=20), 30) is None


def test_respan_reuses_loaded_blocks_and_computes_the_same(thirty_blocks):
    old = load_span(thirty_blocks, 0, 10, progress=False)
    moved = respan(old, thirty_blocks, 5, 15, torch.float32, "cpu")
    fresh = load_span(thirty_blocks, 5, 15, progress=False)
    assert moved.layers[0].mlp.up_proj.weight is old.layers[5].mlp.up_proj.weight  # shared, not copied
    assert [layer.self_attn.layer_idx for layer in old.layers] == list(range(10)), "the old span is untouched"
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        a_cache, b_cache = moved.new_cache(), fresh.new_cache()
        for piece in (x[:, :4], x[:, 4:]):  # a prefix, then one more token through the KV cache
            assert torch.equal(moved(piece, cache=a_cache), fresh(piece, cache=b_cache))


@pytest.mark.slow
def test_three_workers_of_ten_blocks_cover_thirty(thirty_blocks):
    """Three workers asked for 10 blocks each start at once, one of them the others' initial peer. With no time
    to listen before choosing, all three take 0:10; rebalancing then moves two of them, one at a time, until
    they serve 0:30 between them, and a client generates the local model's text through them."""
    port = free_port()
    flags = ["--model", thirty_blocks, "--num-blocks", "10", *WORKER_FLAGS, "--throughput", "100",
             "--discovery-wait", "0", "--rebalance-interval", "1"]
    seed = f"tcp://127.0.0.1:{port}"
    with LocalSwarm([[*flags, "--port", str(port)], [*flags, "--initial-peers", seed],
                     [*flags, "--initial-peers", seed]]) as swarm:
        try:
            def covered() -> bool:
                served = np.zeros(30, int)
                for start, end in spans(swarm.endpoints):
                    served[start:end] += 1
                return bool(served.min() == 1)

            assert [(w.start, w.end) for w in swarm.workers] == [(0, 10)] * 3
            assert wait_until(covered, 30, poll=0.5) is not None, spans(swarm.endpoints)
            assert sum("moved from blocks 0:10" in line for w in swarm.workers for line in w.output) == 2
            assert wait_until(lambda: sorted(e.span for e in pull_table(seed)) == [(0, 10), (10, 20), (20, 30)], 10)
            prompt = [3, 1, 4, 1, 5]
            model = AutoDistributedModelForCausalLM.from_pretrained(thirty_blocks, dtype=torch.float32,
                                                                    initial_peers=[swarm.endpoints[2]])
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
            assert out[0].tolist() == reference_tokens(thirty_blocks, prompt, 6)
        finally:
            stop_all(swarm.workers)
