"""Forward+backward through the swarm vs the same model in one process: training tokens/s, side by side.

    python perf/bench_training.py [--batch 16] [--seq 128] [--threads 2] [--pipeline-batches 16 64]

Both sides compute d(loss)/d(input embeddings), the gradient every client-side
trainable (prompts, heads, adapters) needs; the blocks' weights stay frozen.
The swarm is 2 workers on loopback (blocks 0:15 and 15:30); its backward
requests recompute each span's forward on the worker.

A second table runs forward+backward of larger batches through the swarm's
blocks alone (embeddings, blocks, final norm; a fixed random projection of the
last hidden states as the loss, so no LM head dilutes the difference) whole
(micro_batches=1) and in micro-batches kept in flight along the chain
(micro_batches automatic); its ratios are automatic / whole.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("bench_training")


def fwd_bwd_tokens_per_s(model, ids, repeats) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def blocks_fwd_bwd_tokens_per_s(model, ids, repeats) -> float:
    """Training tokens/s through embeddings, the remote blocks and the final norm: what pipelining changes."""
    base = model.model
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        embeds = base.embed_tokens(ids).detach().requires_grad_(True)
        (base(inputs_embeds=embeds).last_hidden_state * weights).sum().backward()
        best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pipeline-batches", type=int, nargs="*", default=[16, 64],
                        help="batch sizes (x --seq tokens) run whole and in micro-batches")
    parser.add_argument("--wire", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default="perf/out/bench_training.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm

    folder = str(convert())
    local = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).requires_grad_(False)
    ids = torch.randint(0, local.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    log.info("local: forward+backward")
    local_tps = fwd_bwd_tokens_per_s(local, ids, args.repeats)
    worker_args = [["--model", folder, "--blocks", span, "--threads", str(args.threads)] for span in ("0:15", "15:30")]
    with LocalSwarm(worker_args) as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            folder, initial_peers=swarm.endpoints, wire_dtype=getattr(torch, args.wire)).requires_grad_(False)
        log.info("swarm: forward+backward")
        swarm_tps = fwd_bwd_tokens_per_s(remote, ids, args.repeats)
        pipeline = {}
        for micro_batches, name in ((1, "whole"), (None, "micro")):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=swarm.endpoints, wire_dtype=getattr(torch, args.wire),
                micro_batches=micro_batches, request_timeout=600.0).requires_grad_(False)
            for b in args.pipeline_batches:
                log.info("swarm: blocks forward+backward, batch %d, micro_batches=%s", b, micro_batches)
                batch_ids = torch.randint(0, local.config.vocab_size, (b, args.seq),
                                          generator=torch.Generator().manual_seed(b))
                pipeline[f"{name}_b{b}_tok_s"] = blocks_fwd_bwd_tokens_per_s(model, batch_ids, args.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    print(f"\nSmolLM2-135M forward+backward, batch {args.batch} x {args.seq} tokens; swarm = 2 workers on loopback, "
          f"{args.wire} on the wire; {machine}; {date.today()}")
    print(f"{'':24} {'local':>10} {'swarm':>10} {'ratio':>7}")
    print(f"{'training tokens/s':24} {local_tps:10.1f} {swarm_tps:10.1f} {swarm_tps / local_tps:7.2f}")
    print(f"\n{f'swarm blocks, {args.seq} tokens':24} {'whole':>10} {'micro':>10} {'ratio':>7}")
    for b in args.pipeline_batches:
        whole, micro = pipeline[f"whole_b{b}_tok_s"], pipeline[f"micro_b{b}_tok_s"]
        print(f"{f'fwd+bwd tokens/s, b{b}':24} {whole:10.1f} {micro:10.1f} {micro / whole:7.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "date": str(date.today()), "args": vars(args),
                               "local_tok_s": local_tps, "swarm_tok_s": swarm_tps, "pipeline": pipeline}, indent=2))


if __name__ == "__main__":
    main()
