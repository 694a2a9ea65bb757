"""GPU figures in one run: copy bandwidth, then transformers in one process vs a 2-worker Corolla swarm on one GPU.

    python perf/gpu_bench.py [--quick] [--runs llama3-8b:none,llama2-70b:nf4] [--json PATH]
    python perf/gpu_bench.py --runs llama2-70b:none:2    # bf16 70B, one worker per GPU (two H200s)

For each model shape (random-normal weights, std 0.02: no checkpoint is read)
and weight format: (a) plain transformers in this process (eager generate(),
batch 1, a 128-token prompt, 64 new tokens) and (b) two worker processes serving
half the blocks each (on the same GPU, or one per GPU where a run names 2 GPUs:
shape:quantization:2) plus the Corolla client on the first GPU, once per worker
decode path (--paths: "graph" replays CUDA graphs of the eager step, the
workers' default: the slot pool's graph for one slot (worker/slots.py),
"compiled" each session's graph of the compiled step, "graph-bnb" the graph path with nf4's one-token
products on bitsandbytes' kernel instead of Corolla's). Per path: single-batch decode steps/s with
hops relayed by the client and pushed worker to worker, each worker's time per
step (from its metrics: the rest is client and bus), greedy tokens equal to
transformers', and drift teacher-forced on transformers' tokens (top-1
agreement, logits error), against transformers and against the same weights
computed in float32 (bf16 and nf4 runs; transformers' own distance from float32
is printed beside it, the yardstick for both); forward tokens/s (batch 1 and 64,
128 tokens) on the first path. Decode steps/s are also given as a share of the memory-bandwidth
floor: measured copy bandwidth / bytes of weights one decode step reads (with
one worker per GPU a step still reads each byte once, half on each GPU in turn,
so the floor is one GPU's). Forward tokens/s are given as a share of their
roofline: a pass reads every weight once and does every token's multiply-adds
at the measured bf16 matrix-product rate, so it takes at least the longer. It
also checks the CUDA-graph decode path against the eager one in process:
greedy tokens identical in float32, hidden states close in bf16 (the run fails
otherwise). Prints a table last and writes JSON ($OUT/gpu_bench.json when OUT
is set) and the workers' logs beside it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import re
import socket
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("gpu_bench")

DEVICE = "cuda:0"
DTYPE = torch.bfloat16
SEED = 0
PROMPT_TOKENS, NEW_TOKENS = 128, 64
FORWARD_BATCHES, FORWARD_TOKENS = (1, 64), 128
COPY_BYTES = 2 << 30  # per buffer: far beyond the L2 cache
COPY_REPEATS = 20
MATMUL_SIZE, MATMUL_REPEATS = 8192, 10
SHAPES = {  # LlamaConfig keywords
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "tiny": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096),
}
DEFAULT_RUNS = "llama3-8b:none,llama2-70b:nf4"
DECODE_PATHS = ("graph", "compiled", "graph-bnb")
DEFAULT_PATHS = "graph,compiled"
QUICK_RUNS = "tiny:none,tiny:nf4"
SLOW_BASELINE_STEPS_S = 20  # below this, one timed repeat of the baseline is enough (and saves minutes)
FP32_CHECK_TOKENS = 32
GRAPH_CHECK_SESSIONS = 2  # figures of the last one
FP32_REL_TOLERANCE = 1e-3
BF16_REL_TOLERANCE = 5e-2  # bf16 through tens of blocks, different attention kernels (masked static vs dynamic)
WORKER_READY_TIMEOUT = 480.0  # start-up compiles the decode step


def llama_config(shape: str, dtype: torch.dtype = DTYPE):
    from transformers import LlamaConfig
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0)  # no EOS: every generation runs its full length
    config.dtype = dtype
    config._attn_implementation = "sdpa"
    return config


def random_causal_lm(cls, config, dtype: torch.dtype, quantization: str, device: str = DEVICE):
    """A causal LM (transformers' or Corolla's client) with the same random weights as `random_span` gives the
    workers: blocks from their per-block generators, embeddings / norm / head from the head's."""
    from corolla.worker.quantize import quantize_linears
    from corolla.worker.random_weights import HEAD_BLOCK, block_generator, fill_random_

    with torch.device("meta"):
        model = cls(config)
    base = model.model
    head = block_generator(SEED, HEAD_BLOCK, device)
    for module in (base.embed_tokens, base.norm, model.lm_head):
        fill_random_(module, head, dtype, device)
    with torch.device(device):
        base.rotary_emb = type(base.rotary_emb)(config=config)
    for i, layer in enumerate(base.layers if isinstance(base.layers, torch.nn.ModuleList) else ()):
        fill_random_(layer, block_generator(SEED, i, device), dtype, device)
        quantize_linears(layer, quantization, nf4_kernel=False)  # the baseline: bitsandbytes as it is
    return model.eval()


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every block, the final norm and the LM head (one embedding row)."""
    from corolla.worker.quantize import weight_bytes
    base = model.model
    return weight_bytes(base.layers) + weight_bytes(base.norm) + weight_bytes(model.lm_head) + \
        base.embed_tokens.weight[0].numel() * base.embed_tokens.weight.element_size()


def median_gpu_seconds(op, repeats: int) -> float:
    """Median GPU time of `op()` between CUDA events, after three warm-up calls."""
    for _ in range(3):
        op()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus bytes written per second (median of timed copies)."""
    src = torch.randn(COPY_BYTES // 2, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = median_gpu_seconds(lambda: dst.copy_(src), COPY_REPEATS)
    assert torch.equal(dst, src)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / seconds


def matmul_flops() -> float:
    """A large bf16 matrix product on random data, floating-point operations per second (median of timed ones)."""
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    seconds = median_gpu_seconds(lambda: a @ b, MATMUL_REPEATS)
    del a, b
    torch.cuda.empty_cache()
    return 2 * MATMUL_SIZE ** 3 / seconds


def linear_flops_per_token(model) -> int:
    """Multiply-adds of every linear layer (blocks and LM head) for one token, as operations; attention over a
    128-token context adds about 0.1% at these shapes and is left out."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def forward_floor(tokens: int, weight_bytes: int, flops_per_token: int, bandwidth: float, flops: float
                  ) -> tuple[float, str]:
    """Roofline tokens/s of one forward pass over `tokens` tokens: it reads every weight once and does every
    token's multiply-adds, so it takes at least the longer of the two; and which one bounds it."""
    read, compute = weight_bytes / bandwidth, tokens * flops_per_token / flops
    return tokens / max(read, compute), "bandwidth" if read >= compute else "compute"


def timed_generate(model, prompt, n: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - started, out[0, prompt.shape[1]:].cpu()


def decode(model, prompt, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Steps/s of the decode phase alone ((time of N+1 tokens - time of 1) / N, best of `repeats`) and the tokens."""
    timed_generate(model, prompt, 2)  # warm-up: first-call costs (connections, allocator, graph warm-up)
    best, tokens = float("inf"), None
    for _ in range(repeats):
        t_long, tokens = timed_generate(model, prompt, new_tokens + 1)
        t_short, _ = timed_generate(model, prompt, 1)
        best = min(best, (t_long - t_short) / new_tokens)
    return 1.0 / best, tokens


def forward_ids(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, FORWARD_TOKENS), generator=torch.Generator().manual_seed(2)).to(DEVICE)


def forward_tokens_per_s(model, batch: int, vocab: int, repeats: int) -> float:
    ids = forward_ids(batch, vocab)
    model(ids[:1, :8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return batch * FORWARD_TOKENS / best


def graph_check(model, tokens: torch.Tensor, compile_decode: bool) -> dict:
    """Teacher-force `tokens` (prompt, then what generate() chose) through the model's blocks twice: eagerly with a
    DynamicCache (the worker's eager path) and as the worker's CUDA-graph replays over a static cache, in
    GRAPH_CHECK_SESSIONS sessions one after another. Returns, for the last one, the
    largest relative error of the steps' hidden states, at how many steps the graph path's greedy token agrees
    with the eager path's and with generate()'s (all of them: the same greedy generation), and step times."""
    from corolla.models.registry import family_for
    from corolla.worker.cuda_graph import GraphDecoder

    config = model.config
    with torch.device("meta"):
        span = family_for(config).span(config, 0, config.num_hidden_layers)
    span.layers = model.model.layers  # the same blocks, no second copy of the weights
    with torch.device(DEVICE):
        span.rotary_emb = type(span.rotary_emb)(config=config)
    dtype = model.model.embed_tokens.weight.dtype
    graphs = GraphDecoder(span, 0, len(span.layers), config.hidden_size, dtype, torch.device(DEVICE),
                          compile=compile_decode)
    prompt, steps = tokens[:PROMPT_TOKENS], tokens[PROMPT_TOKENS:]
    embed = model.model.embed_tokens

    def greedy(hidden):
        return int(model.lm_head(model.model.norm(hidden.to(DEVICE)))[0, -1].argmax())

    with torch.inference_mode():
        for _ in range(GRAPH_CHECK_SESSIONS):  # a worker captures each session's graph after earlier ones are gone
            errors, agree, match, times = [], 0, 0, {"eager": [], "graph": []}
            dynamic = span.new_cache()
            static = graphs.new_cache(1, 0, len(span.layers), "", len(tokens))
            positions = torch.arange(PROMPT_TOKENS, device=DEVICE)[None]
            h_eager = span(embed(prompt[None].to(DEVICE)), position_ids=positions, cache=dynamic)
            h_graph = span(embed(prompt[None].to(DEVICE)), position_ids=positions, cache=static)
            for k, token in enumerate(steps):
                chosen = greedy(h_graph)
                agree += greedy(h_eager) == chosen
                match += int(token) == chosen
                position = PROMPT_TOKENS + k
                hidden = embed(token.view(1, 1).to(DEVICE))
                torch.cuda.synchronize()
                started = time.perf_counter()
                h_eager = span(hidden, position_ids=torch.tensor([[position]], device=DEVICE), cache=dynamic)
                torch.cuda.synchronize()
                times["eager"].append(time.perf_counter() - started)
                started = time.perf_counter()
                h_graph = graphs.step(static, position, hidden, None)
                times["graph"].append(time.perf_counter() - started)
                assert h_graph is not None, "the graph path declined a batch-1 single-token step"
                errors.append(float((h_graph.to(DEVICE).float() - h_eager.float()).norm() / h_eager.float().norm()))
            del static
    return {"max_rel_err": max(errors), "greedy_agree": agree, "greedy_match_generate": match, "steps": len(steps),
            "eager_step_ms": 1e3 * statistics.median(times["eager"][1:]),
            "graph_step_ms": 1e3 * statistics.median(times["graph"][1:]),
            "graph_first_step_ms": 1e3 * times["graph"][0]}  # the capture, then a replay


def fp32_graph_check(compile_decode: bool) -> dict:
    """Greedy tokens of the CUDA-graph path equal transformers' eager generate() in float32."""
    from transformers import LlamaForCausalLM
    config = llama_config("tiny", torch.float32)
    model = random_causal_lm(LlamaForCausalLM, config, torch.float32, "none")
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, tokens = timed_generate(model, prompt.to(DEVICE), FP32_CHECK_TOKENS)
    check = graph_check(model, torch.cat([prompt[0], tokens]), compile_decode)
    check["passed"] = check["greedy_agree"] == check["greedy_match_generate"] == check["steps"] and \
        check["max_rel_err"] < FP32_REL_TOLERANCE
    return check


def checked(check, *args) -> dict:
    """A check's figures, or its failure (the benchmark's figures still count)."""
    try:
        return check(*args)
    except Exception as e:
        log.exception("%s failed", check.__name__)
        return {"passed": False, "error": f"{type(e).__name__}: {e}"}


class ForcedTokens:
    """A logits processor that teacher-forces a reference generation: it keeps each step's raw logits, then leaves
    only the reference token. The swarm then decodes through its real path (graphs, compiled or not) on exactly
    the reference's inputs, so its logits can be compared step by step even where a free-running greedy decode of
    near-uniform random-weight logits would branch off after one tie-break."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.logits = tokens, []

    def __call__(self, input_ids, scores):
        self.logits.append(scores[0].float().cpu())
        forced = torch.full_like(scores, float("-inf"))
        forced[:, int(self.tokens[len(self.logits) - 1])] = 0
        return forced


def local_logits(model, prompt, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, prompt.shape[1]:].cpu(), torch.stack([l[0].float().cpu() for l in out.logits])


def logits_error(ours: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    errors = (ours - reference).norm(dim=-1) / reference.norm(dim=-1)
    return {"top1_agree": int((ours.argmax(-1) == tokens).sum()), "steps": len(tokens),
            "max_rel_err": float(errors.max()), "median_rel_err": float(errors.median())}


def float32_logits(model, prompt, tokens: torch.Tensor) -> torch.Tensor:
    """The model's weights computed in float32, teacher-forced on `tokens`: per-step logits, the yardstick for every
    bf16 computation of the same weights (transformers' and the swarm's alike; what bf16 itself costs is
    transformers' distance from it). nf4 layers count as the float32 matrices they dequantize to, so both nf4
    kernels can be held to it. Each block turns float32 just for its own pass (bf16 -> float32 -> bf16 is exact),
    so a model that fills the GPU in bf16 (70B on one H200) needs room for only one block in float32."""
    base, dtype = model.model, model.dtype
    ends = [base.embed_tokens, base.norm, model.lm_head]
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def cast(module: torch.nn.Module, to: torch.dtype) -> None:  # every parameter but quantized layers'
        for m in module.modules():
            if not hasattr(getattr(m, "weight", None), "quant_state"):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(to)

    def widen(block, args) -> None:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                state = getattr(getattr(child, "weight", None), "quant_state", None)
                if state is not None:
                    import bitsandbytes.functional as bnbf
                    linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                             device=DEVICE, dtype=torch.float32)
                    exact = copy.copy(state)  # levels times scales in float32, not rounded to the layer's dtype
                    exact.dtype = torch.float32
                    linear.weight.data = bnbf.dequantize_4bit(child.weight.data, exact)
                    if child.bias is not None:
                        linear.bias.data = child.bias.data.float()
                    swapped.append((parent, name, child))
                    setattr(parent, name, linear)
        cast(block, torch.float32)

    def narrow(block, args, out) -> None:
        while swapped:
            parent, name, child = swapped.pop()
            setattr(parent, name, child)
        cast(block, dtype)

    hooks = [h for layer in base.layers
             for h in (layer.register_forward_pre_hook(widen), layer.register_forward_hook(narrow))]
    ids = torch.cat([prompt[0], tokens[:-1].to(prompt.device)])[None]
    try:
        for module in ends:
            module.float()
        return model(ids).logits[0, prompt.shape[1] - 1:].float().cpu()
    finally:
        for h in hooks:
            h.remove()
        for module in ends:
            module.to(dtype)


def float32_drift(model, prompt, tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    """What bf16 itself costs: transformers' logits (`reference`, greedy `tokens`) against the float32 ones, which
    come along under "logits" as the yardstick of every swarm path."""
    fp32 = float32_logits(model, prompt, tokens)
    return {**logits_error(reference, fp32.argmax(-1), fp32), "logits": fp32}


def drift(model, prompt, tokens: torch.Tensor, reference: torch.Tensor, fp32: torch.Tensor | None) -> dict:
    """The swarm's logits teacher-forced on transformers' greedy tokens: how often its top-1 is the same token,
    and the largest relative error of a step's logits; and the same against the float32 computation (`fp32`)."""
    from transformers import LogitsProcessorList
    forced = ForcedTokens(tokens)
    model.generate(prompt, max_new_tokens=len(tokens), do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([forced]))
    ours = torch.stack(forced.logits)
    result = logits_error(ours, tokens, reference)
    if fp32 is not None:
        result["float32"] = logits_error(ours, fp32.argmax(-1), fp32)
    return result


def step_seconds(ports: list[int], histogram: str = "corolla_worker_request_seconds", labels: str = 'kind="step"'
                 ) -> list[tuple[float, int]]:
    """Each worker's total seconds and count in one series of a histogram of its Prometheus metrics (default: its
    answered steps, receipt to reply)."""
    import urllib.request
    totals = []
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        seconds = re.search(rf'{histogram}_sum\{{{re.escape(labels)}\}} (\S+)', text)
        count = re.search(rf'{histogram}_count\{{{re.escape(labels)}\}} (\S+)', text)
        totals.append((float(seconds[1]) if seconds else 0.0, int(float(count[1])) if count else 0))
    return totals


def worker_step_ms(model, prompt, new_tokens: int, ports: list[int]) -> list[float]:
    """Each worker's mean time per decode step from receipt to reply (a generate of N+1 tokens minus one of 1),
    so that what the client and the bus add per token is the rest of the step time."""
    before = step_seconds(ports)
    timed_generate(model, prompt, new_tokens + 1)
    middle = step_seconds(ports)
    timed_generate(model, prompt, 1)
    after = step_seconds(ports)
    return [1e3 * ((m[0] - b[0]) - (a[0] - m[0])) / new_tokens for b, m, a in zip(before, middle, after)]


def forward_split(model, ids: torch.Tensor, ports: list[int]) -> dict:
    """One more (warm) forward through the swarm: its time and each worker's compute in it, all passes summed (the
    rest is the client, the bus and the workers' hand-offs)."""
    series = ("corolla_worker_compute_seconds", 'queue="forward"')
    before = step_seconds(ports, *series)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model(ids)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - started)
    return {"ms": ms, "worker_compute_ms": [1e3 * (a[0] - b[0]) for a, b in zip(step_seconds(ports, *series), before)]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swarm_path(path: str, config, folder: str, quantization: str, gpus: int, prompt, new_tokens: int, reference,
               fp32, logs: Path, forward: bool) -> dict:
    """One decode path of the workers (DECODE_PATHS: see the module's docstring):
    decode relayed by the client and pushed worker to worker, drift, per-worker step time, and (once) forward."""
    from corolla.client.config import ClientConfig
    from corolla.client.families import DistributedLlamaForCausalLM
    from corolla.worker.launcher import LocalSwarm

    half = config.num_hidden_layers // 2
    ports = [free_port(), free_port()]
    devices = [f"cuda:{k % gpus}" for k in range(2)]
    common = ["--model", folder, "--dtype", "bfloat16", "--random-weights", "--seed",
              str(SEED), "--quantization", quantization, "--no-mdns", "--throughput", "1",
              *(["--compile-decode"] if path == "compiled" else []),
              *(["--no-nf4-kernel"] if path == "graph-bnb" else [])]
    spans = [f"0:{half}", f"{half}:{config.num_hidden_layers}"]
    name = f"{config.num_hidden_layers}x{config.hidden_size}_{quantization}_{path}"
    log.info("%s: starting 2 workers on %s", name, ", ".join(devices))
    result: dict = {"worker_devices": devices}
    with LocalSwarm([[*common, "--device", device, "--blocks", span, "--metrics-port", str(port)]
                     for device, span, port in zip(devices, spans, ports)],
                    timeout=WORKER_READY_TIMEOUT, env={"TORCH_LOGS": "recompiles"}) as swarm:
        try:
            client = random_causal_lm(DistributedLlamaForCausalLM, config, DTYPE, "none")
            for mode, push in (("relay", False), ("push", True)):
                client.attach_swarm(ClientConfig(initial_peers=swarm.endpoints, wire_dtype=None,
                                                 use_server_to_server=push), Path(folder).name)
                with torch.inference_mode():
                    log.info("%s: decode, %s", name, mode)
                    steps_s, tokens = decode(client, prompt, new_tokens, 3)
                    result[f"decode_{mode}_steps_s"] = steps_s
                    result[f"tokens_equal_local_{mode}"] = int((tokens == reference[0]).long().cumprod(0).sum())
                    result[f"worker_step_ms_{mode}"] = worker_step_ms(client, prompt, new_tokens, ports)
            with torch.inference_mode():
                log.info("%s: drift, teacher-forced", name)
                result["drift"] = drift(client, prompt, *reference, fp32)
                if forward:
                    for b in FORWARD_BATCHES:
                        log.info("%s: forward batch %d", name, b)
                        result[f"forward_b{b}_tok_s"] = forward_tokens_per_s(client, b, config.vocab_size, 2)
                        result[f"forward_b{b}_split"] = forward_split(client, forward_ids(b, config.vocab_size), ports)
        finally:
            for i, w in enumerate(swarm.workers):
                (logs / f"worker{i}_{name}.log").write_text("".join(w.output))
        result["worker_notes"] = [line.strip() for w in swarm.workers for line in w.output
                                  if "compiled in" in line or "WARNING" in line and "RANDOM WEIGHTS" not in line]
    result["decode_steps_s"] = max(result["decode_relay_steps_s"], result["decode_push_steps_s"])
    # the figures reach the log as each path ends, so a run cut off later still leaves them
    log.info("%s: %.1f steps/s relayed, %.1f pushed; workers %s ms/step; drift %s", name,
             result["decode_relay_steps_s"], result["decode_push_steps_s"], result["worker_step_ms_relay"],
             result["drift"])
    del client
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_model(shape: str, quantization: str, gpus: int, bandwidth: float, flops: float, quick: bool, logs: Path,
              paths: list[str]) -> dict:
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    new_tokens = 8 if quick else NEW_TOKENS
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(DEVICE)
    result: dict = {"shape": shape, "quantization": quantization, "dtype": str(DTYPE), "new_tokens": new_tokens,
                    "gpus": gpus}
    log.info("%s %s: building the one-process model", shape, quantization)
    local = random_causal_lm(LlamaForCausalLM, config, DTYPE, quantization)
    result["decode_bytes"] = decode_bytes(local)
    result["floor_steps_s"] = bandwidth / result["decode_bytes"]
    flops_per_token = linear_flops_per_token(local)
    for b in FORWARD_BATCHES:
        # the swarm's micro-batches (at most one a row) can keep all its GPUs busy at once: its floor counts them
        result[f"forward_floor_b{b}"] = {side: forward_floor(b * FORWARD_TOKENS, result["decode_bytes"],
                                                             flops_per_token, n * bandwidth, n * flops)
                                         for side, n in (("local", 1), ("swarm", min(gpus, b)))}
    with torch.inference_mode():
        log.info("%s %s: transformers decode", shape, quantization)
        steps_s, _ = decode(local, prompt, new_tokens, 1)
        if steps_s > SLOW_BASELINE_STEPS_S:
            steps_s = max(steps_s, decode(local, prompt, new_tokens, 2)[0])
        result["local"] = {"decode_steps_s": steps_s}
        reference = local_logits(local, prompt, new_tokens + 1)
        fp32 = None
        if quantization in ("none", "nf4"):
            log.info("%s: bf16 vs float32 drift", shape)
            result["float32_drift"] = checked(float32_drift, local, prompt, *reference)
            fp32 = result["float32_drift"].pop("logits", None)
        for b in FORWARD_BATCHES:
            result["local"][f"forward_b{b}_tok_s"] = forward_tokens_per_s(local, b, config.vocab_size, 2)
    if quantization == "none":
        log.info("%s: CUDA-graph vs eager decode, in process", shape)
        # The capture of the eager step here (the workers compile theirs, as the float32 check does): a compile of
        # all the blocks would cost the run minutes.
        check = checked(graph_check, local, torch.cat([prompt[0].cpu(), reference[0]]), False)
        check.setdefault("passed", check["max_rel_err"] < BF16_REL_TOLERANCE)
        result["graph_check_bf16"] = check
    del local
    gc.collect()
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        result["paths"] = {path: swarm_path(path, config, folder, quantization, gpus, prompt, new_tokens, reference,
                                            fp32, logs, forward=k == 0) for k, path in enumerate(paths)}
    best = max(result["paths"].values(), key=lambda r: r["decode_steps_s"])
    result["swarm"] = {"decode_steps_s": best["decode_steps_s"],
                       **{k: v for k, v in result["paths"][paths[0]].items() if k.startswith("forward_")}}
    for side in ("local", "swarm"):
        result[side]["floor_share"] = result[side]["decode_steps_s"] / result["floor_steps_s"]
    return result


def print_report(report: dict) -> None:
    print(f"\n{report['machine']}; {report['date']}; device-to-device copy {report['copy_bandwidth_gb_s']:.0f} GB/s "
          f"(read + write) and a bf16 matrix product {report['matmul_tflops']:.0f} TFLOP/s, of one GPU; prompt "
          f"{PROMPT_TOKENS} tokens, batch 1; transformers on one GPU; swarm = 2 workers + client")
    check = report["graph_check_fp32"]
    if "error" in check:
        print(f"CUDA-graph decode vs eager, float32: FAILED {check['error']}")
    else:
        print(f"CUDA-graph decode vs eager, float32: greedy tokens {check['greedy_match_generate']}/{check['steps']} "
              f"identical to transformers' generate(), max relative error {check['max_rel_err']:.1e}")
    for r in report["runs"]:
        name = f"{r['shape']} {r['quantization'] if r['quantization'] != 'none' else 'bf16'}"
        if "error" in r:
            print(f"\n{name}: FAILED {r['error']}")
            continue
        print(f"\n{name}: {r['decode_bytes'] / 1e9:.1f} GB of weights read per decode step, floor "
              f"{r['floor_steps_s']:.0f} steps/s; transformers eager generate() {r['local']['decode_steps_s']:.1f} "
              f"steps/s ({r['local']['floor_share']:.0%} of the floor); swarm workers on "
              f"{' and '.join(next(iter(r['paths'].values()))['worker_devices'])}")
        g = r.get("graph_check_bf16", {})
        if "error" in g:
            print(f"  in-process CUDA-graph check FAILED: {g['error']}")
        elif g:
            print(f"  in process, all blocks: eager step {g['eager_step_ms']:.2f} ms, CUDA-graph step "
                  f"{g['graph_step_ms']:.2f} ms (first, with its capture: {g['graph_first_step_ms']:.0f} ms); bf16 "
                  f"max relative error {g['max_rel_err']:.1e}; greedy tokens {g['greedy_agree']}/{g['steps']} = eager "
                  f"path's, {g['greedy_match_generate']}/{g['steps']} = generate()'s")
        f32 = r.get("float32_drift")
        if f32 and "error" in f32:
            print(f"  bf16 vs float32 drift FAILED: {f32['error']}")
        elif f32:
            print(f"  bf16 itself: transformers bf16 vs the same weights in float32, teacher-forced: top-1 "
                  f"{f32['top1_agree']}/{f32['steps']}, logits max relative error {f32['max_rel_err']:.1e}")
        print(f"  {'swarm decode path':18} {'relay':>7} {'push':>7} {'% floor':>8} {'worker ms/step':>15} "
              f"{'= greedy':>9} {'forced top-1':>13} {'logits rel err':>15} {'vs float32: top-1, err':>23}")
        for path, p in r["paths"].items():
            d = p["drift"]
            workers = "+".join(f"{ms:.1f}" for ms in p["worker_step_ms_relay"])
            vs32 = f"{d['float32']['top1_agree']}/{d['float32']['steps']}, {d['float32']['max_rel_err']:.1e}" \
                if "float32" in d else "-"
            print(f"  {path:18} {p['decode_relay_steps_s']:7.1f} {p['decode_push_steps_s']:7.1f} "
                  f"{p['decode_steps_s'] / r['floor_steps_s']:8.0%} {workers:>15} "
                  f"{p['tokens_equal_local_relay']:>4}/{r['new_tokens'] + 1:<4} {d['top1_agree']:>6}/{d['steps']:<6} "
                  f"{d['max_rel_err']:15.1e} {vs32:>23}")
            for note in p["worker_notes"]:
                print(f"    worker: {note}")
        print(f"  {'forward tokens/s (% of roofline floor, bound by)':52} {'transformers':>26} {'swarm':>26}")
        for b in FORWARD_BATCHES:
            key, floors = f"forward_b{b}_tok_s", r[f"forward_floor_b{b}"]
            print(f"  {f'{b} x {FORWARD_TOKENS}':52} " + " ".join(
                f"{f'{r[side][key]:,.0f} ({r[side][key] / floors[side][0]:.0%}, {floors[side][1]})':>26}"
                for side in ("local", "swarm")))
            split = next(iter(r["paths"].values())).get(f"forward_b{b}_split")
            if split:
                print(f"    one swarm forward {split['ms']:.1f} ms, its workers computing "
                      f"{' + '.join(f'{c:.1f}' for c in split['worker_compute_ms'])} ms; transformers "
                      f"{1e3 * b * FORWARD_TOKENS / r['local'][key]:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few tokens: check every path fast")
    parser.add_argument("--runs", help=f"shape:quantization[:gpus],... (default {DEFAULT_RUNS}; --quick: "
                        f"{QUICK_RUNS}); gpus 2: one worker per GPU, else both on the first")
    parser.add_argument("--json", help="where to write the figures (default $OUT/gpu_bench.json or perf/out/)")
    parser.add_argument("--paths", default=DEFAULT_PATHS,
                        help=f"workers' decode paths to measure, of {', '.join(DECODE_PATHS)}: graph (CUDA graphs of the "
                             f"eager step), compiled, graph-bnb (graph, nf4 on bitsandbytes' kernel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA GPU")
    runs = [(r + ":1").split(":")[:3] for r in (args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)).split(",")]
    if any(r[0] not in SHAPES or not r[2].isdigit() or not 1 <= int(r[2]) <= 2 for r in runs):
        raise SystemExit(f"--runs: each is shape:quantization[:gpus] with a shape of {', '.join(SHAPES)} and 1 or 2 "
                         f"GPUs, not {args.runs}")
    paths = args.paths.split(",")
    if not paths or not set(paths) <= set(DECODE_PATHS):
        raise SystemExit(f"--paths: a comma-separated list of {', '.join(DECODE_PATHS)}, not {args.paths}")
    if max(int(r[2]) for r in runs) > torch.cuda.device_count():
        raise SystemExit(f"--runs asks for 2 GPUs; this machine has {torch.cuda.device_count()}")
    out = Path(args.json or Path(os.environ.get("OUT") or "perf/out") / "gpu_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    props = torch.cuda.get_device_properties(DEVICE)
    machine = f"{torch.cuda.device_count()}x {props.name} ({props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} " \
              f"CPU cores, torch {torch.__version__}"
    report: dict = {"machine": machine, "date": str(date.today()), "platform": platform.platform(), "runs": []}
    report["copy_bandwidth_gb_s"] = copy_bandwidth() / 1e9
    log.info("copy bandwidth %.0f GB/s (read + write)", report["copy_bandwidth_gb_s"])
    report["matmul_tflops"] = matmul_flops() / 1e12
    log.info("bf16 matrix product %.0f TFLOP/s", report["matmul_tflops"])
    report["graph_check_fp32"] = checked(fp32_graph_check, True)
    log.info("float32 CUDA-graph check: %s", report["graph_check_fp32"])
    for shape, quantization, gpus in runs:
        try:
            report["runs"].append(run_model(shape, quantization, int(gpus), report["copy_bandwidth_gb_s"] * 1e9,
                                            report["matmul_tflops"] * 1e12, args.quick, out.parent,
                                            paths))
        except Exception as e:  # the other runs' figures still count
            log.exception("%s %s failed", shape, quantization)
            report["runs"].append({"shape": shape, "quantization": quantization, "error": f"{type(e).__name__}: {e}"})
        out.write_text(json.dumps(report, indent=2))

    print_report(report)
    print(f"\nfigures written to {out}")
    failed = [c for c in [report["graph_check_fp32"], *(r.get("graph_check_bf16") for r in report["runs"])]
              if c is not None and not c["passed"]] + [r for r in report["runs"] if "error" in r]
    if failed:
        raise SystemExit(f"FAILED: {failed}")


if __name__ == "__main__":
    main()
