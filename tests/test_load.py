"""64 concurrent sessions on two workers whose cache budget holds 32: admission control, not crashes."""
from __future__ import annotations

import threading

import psutil
import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args

pytestmark = pytest.mark.slow
SESSIONS, SLOTS, NEW = 64, 32, 12


def test_64_sessions_on_a_budget_of_32(tiny_llama_folder):
    from transformers import AutoModelForCausalLM
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    prompts = [torch.tensor([[1 + i, 2 + i % 7, 3 + i % 5, 4]]) for i in range(SESSIONS)]
    solo = [local.generate(p, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False) for p in prompts]
    length = prompts[0].shape[1] + NEW
    args = worker_args(tiny_llama_folder, ["0:2", "2:4"], "--cache-tokens", str(SLOTS * length))
    with LocalSwarm(args) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            tiny_llama_folder, initial_peers=swarm.endpoints, wire_dtype=None, max_retries=12, ban_seconds=0.5)
        processes = [psutil.Process(w.process.pid) for w in swarm.workers]
        rss_before = [p.memory_info().rss for p in processes]
        results, recoveries, errors = {}, {}, []

        def run(i):
            try:
                with model.remote_layers.inference_session(length) as session:
                    results[i] = model.generate(prompts[i], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                                session=session)
                    recoveries[i] = session.recoveries
            except Exception as e:  # surfaced below with the session number
                errors.append((i, e))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        rss_after = [p.memory_info().rss for p in processes]
    assert not errors, errors[:3]
    assert all(torch.equal(results[i], solo[i]) for i in range(SESSIONS))
    assert sum(1 for r in recoveries.values() if r) > 0, "no session was ever refused: the budget was not exercised"
    # KV cache of 32 sessions x 18 tokens of a tiny model is kilobytes; the workers must not balloon
    assert all(after - before < 200 << 20 for before, after in zip(rss_before, rss_after)), (rss_before, rss_after)
