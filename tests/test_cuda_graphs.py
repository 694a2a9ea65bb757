"""CUDA-graph decode on a GPU: a session's graph replays compute what eager steps compute, also when its steps
alternate between its graph and passes batched with other sessions' steps (worker/batching.py writes the batched
token back into the static cache the graph reads).

Skipped where there is no CUDA device (CI); run on a GPU machine with `python -m pytest tests/test_cuda_graphs.py`.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from transformers import DynamicCache, LlamaConfig  # noqa: E402

from corolla.worker.batching import Row, step_together  # noqa: E402
from corolla.worker.cuda_graph import GraphDecoder  # noqa: E402
from corolla.worker.kv_cache import Session  # noqa: E402
from corolla.worker.random_weights import random_span  # noqa: E402

HIDDEN = 64
DEVICE = torch.device("cuda")


def test_graph_replays_and_batched_passes_interleave():
    config = LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    span = random_span(config, 0, 4, torch.float32, DEVICE, seed=3)
    graphs = GraphDecoder(span, 0, 4, HIDDEN, torch.float32, DEVICE)
    prompts = [torch.randn(1, n, HIDDEN, device=DEVICE) for n in (5, 9)]
    tokens = [[torch.randn(1, 1, HIDDEN, device=DEVICE) for _ in range(4)] for _ in prompts]

    def run(hidden, mask, position_ids, cache):  # step_together builds masks and positions on the host, as a worker
        return span(hidden, attention_mask=None if mask is None else mask.to(DEVICE),
                    position_ids=position_ids.to(DEVICE), cache=cache)

    with torch.inference_mode():
        want = []
        for prompt, steps in zip(prompts, tokens):
            cache, n = DynamicCache(config=span.span_config), prompt.shape[1]
            run(prompt, None, torch.arange(n, device=DEVICE)[None], cache)
            want.append([run(t, None, torch.tensor([[n + i]], device=DEVICE), cache).cpu() for i, t in enumerate(steps)])
        sessions = []
        for k, prompt in enumerate(prompts):
            cache = graphs.new_cache(1, 0, 4, "", 32)
            run(prompt, None, torch.arange(prompt.shape[1], device=DEVICE)[None], cache)
            sessions.append(Session(f"s{k}", 0, 4, 1, 32, cache, position=prompt.shape[1]))
        for i, batched in enumerate((False, True, False, True)):  # capture, a shared pass, a replay, a shared pass
            if batched:
                outs = [o.cpu() for o in step_together([Row(s, t[i], None, None) for s, t in zip(sessions, tokens)],
                                                       span.new_cache(), run)]
            else:
                outs = [graphs.step(s.cache, s.position, t[i], None) for s, t in zip(sessions, tokens)]
            for session, out, w in zip(sessions, outs, want):
                session.position += 1
                assert out is not None and (out - w[i]).abs().max() < 1e-4, (i, batched)
        assert all(s.cache.graph is not None for s in sessions)
