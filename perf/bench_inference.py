"""Swarm vs one process, side by side: single-batch decode steps/s and parallel forward tokens/s.

    python perf/bench_inference.py [--threads 2] [--new-tokens 64] [--pipeline-batches 16 64] [--model DIR]
                                   [--json PATH]

The same model (SmolLM2-135M unless --model names a folder) runs (a) locally in
this process with transformers' generate() and forward, and (b) through 2 worker
processes on loopback (each half of the blocks; 0:15 and 15:30 for SmolLM2)
with the Corolla client. Both use the same torch thread
count, and each worker uses it too: the chain's workers compute one after
another, never at once, in single-batch decode. Ratios are swarm / local. The
two sides are measured in alternating rounds with the swarm up throughout, so
that a machine's drift (shared VMs drift by tens of percent) moves both alike;
decode also prints each round's ratio.

A second table runs large batches through the swarm's blocks (embeddings, blocks
and final norm, no LM head) whole (micro_batches=1) and in micro-batches kept in
flight along the chain (micro_batches automatic); its ratios are automatic / whole.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from perf.gpu_bench import free_port, step_seconds  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("bench_inference")
COMPUTE_SERIES = ("corolla_worker_compute_seconds", 'queue="inference"')  # the compute thread's passes


def decode_rate(model, prompt_ids, new_tokens) -> float:
    """Steps/s of the decode phase alone: N / (time for N+1 tokens - time for 1 token)."""
    def timed(n):
        start = time.perf_counter()
        model.generate(prompt_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start
    return new_tokens / (timed(new_tokens + 1) - timed(1))


def paired_decode(local, remote, prompt_ids, new_tokens, repeats) -> tuple[list[float], list[float]]:
    """Decode steps/s of one process and of the swarm, measured in alternating rounds: a machine whose speed
    drifts (a shared VM) then moves both sides of a round alike, and each round's ratio stays fair."""
    for model in (local, remote):
        decode_rate(model, prompt_ids, 2)  # warm-up: first-call costs (connections, routing, allocator) are not decode
    rounds = [(decode_rate(local, prompt_ids, new_tokens), decode_rate(remote, prompt_ids, new_tokens))
              for _ in range(repeats)]
    return [r[0] for r in rounds], [r[1] for r in rounds]


def token_breakdown(model, prompt_ids, steps: int, ports: list[int]) -> dict:
    """Where one relayed swarm decode token's time goes: the median single-token step through the chain, each
    worker's own mean time for it (receipt to reply, from its metrics) and the part of it spent computing, and the
    median empty step (no tokens: both hops, the bus and every hand-off, no compute)."""
    with torch.inference_mode():
        hidden = model.model.embed_tokens(prompt_ids)
        with model.inference_session(max_length=prompt_ids.shape[1] + 2 * steps + 2) as session:
            session.step(hidden)
            token = hidden[:, -1:]
            before, computed, times = step_seconds(ports), step_seconds(ports, *COMPUTE_SERIES), []
            for _ in range(steps):
                started = time.perf_counter()
                session.step(token)
                times.append(time.perf_counter() - started)
            after, empty = step_seconds(ports), []
            computed = [(a[0] - b[0]) / steps for a, b in zip(step_seconds(ports, *COMPUTE_SERIES), computed)]
            for _ in range(steps):
                started = time.perf_counter()
                session.step(token[:, :0])
                empty.append(time.perf_counter() - started)
    return {"step_ms": 1e3 * statistics.median(times),
            "worker_ms": [1e3 * (a[0] - b[0]) / (a[1] - b[1]) for a, b in zip(after, before)],
            "worker_compute_ms": [1e3 * c for c in computed],
            "empty_step_ms": 1e3 * statistics.median(empty)}


def local_step_ms(model, prompt_ids, steps: int) -> float:
    """Median time of one token's step through all blocks and the final norm in this process (no LM head)."""
    from transformers.cache_utils import DynamicCache
    with torch.inference_mode():
        cache, hidden = DynamicCache(), model.model.embed_tokens(prompt_ids)
        model.model(inputs_embeds=hidden, past_key_values=cache, use_cache=True)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            model.model(inputs_embeds=hidden[:, -1:], past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def forward_tokens_per_s(model, batch, seq, repeats, vocab) -> float:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(ids[:1, :8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        best = min(best, time.perf_counter() - start)
    return batch * seq / best


def blocks_tokens_per_s(model, batch, seq, repeats, vocab) -> float:
    """Forward tokens/s through embeddings, the remote blocks and the final norm: what pipelining changes."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.model(ids[:1, :8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.model(ids)
        best = min(best, time.perf_counter() - start)
    return batch * seq / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wire", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--push", choices=["auto", "on", "off"], default="auto", help="server-to-server push")
    parser.add_argument("--pipeline-batches", type=int, nargs="*", default=[16, 64],
                        help="batch sizes (x 128 tokens) run whole and in micro-batches")
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct, converted on first use)")
    parser.add_argument("--json", default="perf/out/bench_inference.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm

    folder = args.model or str(convert())
    local = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    vocab = local.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    results = {"local": {}, "swarm": {}, "pipeline": {}}
    ports = [free_port(), free_port()]
    half, blocks = local.config.num_hidden_layers // 2, local.config.num_hidden_layers
    worker_args = [["--model", folder, "--blocks", span, "--threads", str(args.threads), "--metrics-port", str(port)]
                   for span, port in zip((f"0:{half}", f"{half}:{blocks}"), ports)]
    push = {"auto": None, "on": True, "off": False}[args.push]
    log.info("starting 2 workers")
    with torch.inference_mode(), LocalSwarm(worker_args) as swarm:
        wire = getattr(torch, args.wire)
        remote = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.endpoints,
                                                                 wire_dtype=wire, use_server_to_server=push)
        log.info("decode: %d rounds of one process, then the swarm", args.repeats)
        local_rates, swarm_rates = paired_decode(local, remote, prompt, args.new_tokens, args.repeats)
        results["local"]["decode_rounds_steps_s"], results["swarm"]["decode_rounds_steps_s"] = local_rates, swarm_rates
        results["local"]["decode_steps_s"], results["swarm"]["decode_steps_s"] = max(local_rates), max(swarm_rates)
        log.info("one token's time, by where it goes")
        results["local"]["step_ms"] = local_step_ms(local, prompt, args.new_tokens)
        # relayed: with push, one worker's time would hold its wait for the previous one's output
        relayed = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.endpoints, wire_dtype=wire, use_server_to_server=False)
        results["swarm"].update(token_breakdown(relayed, prompt, args.new_tokens, ports))
        for b in (1, 16):
            log.info("forward batch %d", b)
            for name, model in (("local", local), ("swarm", remote)):
                results[name][f"forward_b{b}_tok_s"] = forward_tokens_per_s(model, b, 128, args.repeats, vocab)
        for micro_batches, name in ((1, "whole"), (None, "micro")):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=swarm.endpoints, wire_dtype=wire, micro_batches=micro_batches,
                request_timeout=600.0, use_server_to_server=push)
            for b in args.pipeline_batches:
                log.info("swarm: forward batch %d, micro_batches=%s", b, micro_batches)
                results["pipeline"][f"{name}_b{b}_tok_s"] = blocks_tokens_per_s(model, b, 128, args.repeats, vocab)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    print(f"\n{Path(folder).name}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; "
          f"swarm = 2 workers on loopback, {args.wire} on the wire; {machine}; {date.today()}")
    print(f"{'metric':28} {'local':>10} {'swarm':>10} {'ratio':>7}")
    for key, label in (("decode_steps_s", "decode steps/s (batch 1)"), ("forward_b1_tok_s", "forward tokens/s, batch 1"),
                       ("forward_b16_tok_s", "forward tokens/s, batch 16")):
        a, b = results["local"][key], results["swarm"][key]
        print(f"{label:28} {a:10.1f} {b:10.1f} {b / a:7.2f}")
    rounds = zip(results["local"]["decode_rounds_steps_s"], results["swarm"]["decode_rounds_steps_s"])
    ratios = [b / a for a, b in rounds]
    print(f"decode, round by round (best of each side above): ratios {' '.join(f'{r:.2f}' for r in ratios)}, "
          f"median {statistics.median(ratios):.2f}")
    local_ms, swarm = results["local"]["step_ms"], results["swarm"]
    own, computing = (" + ".join(f"{v:.1f}" for v in swarm[k]) for k in ("worker_ms", "worker_compute_ms"))
    print(f"\none token's step (all blocks, no LM head): local {local_ms:.1f} ms; "
          f"swarm (relayed) {swarm['step_ms']:.1f} ms = workers' own {own} ms (computing {computing}) + "
          f"{swarm['step_ms'] - sum(swarm['worker_ms']):.1f} ms of bus and client; "
          f"an empty step through both hops {swarm['empty_step_ms']:.1f} ms")
    print(f"\n{'swarm blocks, 128 tokens':28} {'whole':>10} {'micro':>10} {'ratio':>7}")
    for b in args.pipeline_batches:
        a, m = results["pipeline"][f"whole_b{b}_tok_s"], results["pipeline"][f"micro_b{b}_tok_s"]
        print(f"{f'forward tokens/s, batch {b}':28} {a:10.1f} {m:10.1f} {m / a:7.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "date": str(date.today()), "args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
