"""Petals' benchmark table, reproduced on emulated networks: a client and two workers on separate hosts.

    sudo python perf/bench_network.py --network loopback lan-1g lan-100m wan-100m-100ms [--contexts 128 2048]

Each profile builds hosts as network namespaces joined by shaped veth links
(perf/netem.py: tbf for bandwidth, a delaying relay for latency), measures the
link (RTT, throughput) and prints it beside the results. Workers serve SmolLM2-135M
blocks 0:15 and 15:30; the client runs in its own namespace and reaches each
worker through that link. Reported per profile: single-batch decode steps/s at
each context length, parallel forward tokens/s at batch 1 and 16 (128 tokens
each), and the floor that link latency plus compute allow: 1 / (one step's
compute + one round trip per worker).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from perf import netem  # noqa: E402
from perf.bench_inference import decode_steps_per_s, forward_tokens_per_s  # noqa: E402

WORKER_PORT = 31330
RELAY_OFFSET = 100
SPANS = ("0:15", "15:30")


def client_run(args) -> None:
    """Inside the client's namespace: measure through the given worker endpoints and print JSON."""
    torch.set_num_threads(args.threads)
    from corolla import AutoDistributedModelForCausalLM
    out = {}
    for push in (False, True):
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peers, routing="static",
                                                                request_timeout=120.0, use_server_to_server=push)
        vocab, mode = model.config.vocab_size, "push" if push else "relay"
        with torch.inference_mode():
            for ctx in args.contexts:
                prompt = torch.randint(0, vocab, (1, ctx), generator=torch.Generator().manual_seed(ctx))
                out[f"{mode}_decode_{ctx}_steps_s"] = decode_steps_per_s(model, prompt, args.tokens, 1)
            if not push:  # stateless forwards never push
                for batch in args.batches:
                    out[f"forward_b{batch}_tok_s"] = forward_tokens_per_s(model, batch, 128, 1, vocab)
    print(json.dumps(out))


def local_step_seconds(folder: str, threads: int, tokens: int) -> float:
    """Median time of one single-token decode step of the whole model in one process: the floor's compute."""
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(128))
    times = []
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        for _ in range(tokens):
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_profile(name: str, folder: str, args, step_s: float) -> dict:
    from corolla.worker.launcher import spawn_worker
    with netem.Topology(["w1", "w2", "client"], name) as topo:
        link = netem.measure(topo, "client", "w1", max_seconds=2.0) if topo.netns("client") else None
        workers = []
        try:
            ports = (WORKER_PORT, WORKER_PORT + 1)
            delay = netem.PROFILES[name].delay_ms
            peers = []
            for host, span, port in zip(("w1", "w2"), SPANS, ports):
                ns = topo.netns(host)
                # With latency, a relay in the worker's own namespace holds its public address, so the
                # client and the other worker (server-to-server pushes) all reach it through the delay.
                bind = "127.0.0.1" if delay else topo.addr(host)
                workers.append(spawn_worker("--model", folder, "--blocks", span, "--host", bind,
                                            "--port", str(port), "--no-mdns", "--threads", str(args.threads),
                                            prefix=["ip", "netns", "exec", ns] if ns else None))
                if delay:
                    topo.popen(host, [sys.executable, str(ROOT / "perf" / "relay.py"), "--listen",
                                      f"{topo.addr(host)}:{port + RELAY_OFFSET}", "--target", f"127.0.0.1:{port}",
                                      "--delay-ms", str(delay)], stdout=subprocess.DEVNULL)
                peers.append(f"tcp://{topo.addr(host)}:{port + RELAY_OFFSET if delay else port}")
            for w in workers:
                w.wait_ready(180)
            argv = [sys.executable, __file__, "_client", "--model", folder, "--threads", str(args.threads),
                    "--tokens", str(args.tokens), "--contexts", *map(str, args.contexts),
                    "--batches", *map(str, args.batches), "--peers", *peers]
            res = subprocess.run(topo.command("client", argv), capture_output=True, text=True, timeout=3600,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            if res.returncode:
                raise RuntimeError(f"client failed on {name}:\n{res.stderr[-3000:]}")
            figures = json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            for w in workers:
                w.stop()
    rtt_s = (link.rtt_p50_ms / 1000) if link else 0.0
    figures["relay_floor_steps_s"] = 1.0 / (step_s + len(SPANS) * rtt_s)  # a round trip per worker
    figures["push_floor_steps_s"] = 1.0 / (step_s + (len(SPANS) + 1) * rtt_s / 2)  # one one-way delay per link
    figures["link"] = str(link) if link else "loopback (no shaping)"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_client"])
    parser.add_argument("--network", nargs="+", default=["loopback", "lan-1g", "lan-100m", "wan-100m-100ms"],
                        choices=list(netem.PROFILES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[128])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model")
    parser.add_argument("--peers", nargs="+")
    parser.add_argument("--json", default="perf/out/bench_network.json")
    args = parser.parse_args()
    if args.mode == "_client":
        return client_run(args)
    ok, reason = netem.netns_available()
    if not ok and any(netem.PROFILES[n].namespaces for n in args.network):
        sys.exit(f"bench_network: network namespaces unavailable here ({reason}); try --network loopback")
    from corolla.models.convert import convert
    folder = str(convert())
    step_s = local_step_seconds(folder, args.threads, args.tokens)
    print(f"local compute: {1 / step_s:.1f} decode steps/s in one process ({args.threads} threads)", flush=True)
    results = {}
    for name in args.network:
        started = time.perf_counter()
        results[name] = run_profile(name, folder, args, step_s)
        print(f"{name}: {results[name]['link']} ({time.perf_counter() - started:.0f} s)", flush=True)
    fwd_cols = [f"forward_b{b}_tok_s" for b in args.batches]
    print(f"\nSmolLM2-135M over 2 workers; relay = client-relayed hops, push = server-to-server; "
          f"{date.today()}, {os.cpu_count()} cores")
    header = ["profile", *[f"{m} steps/s {c} ctx" for c in args.contexts for m in ("relay", "push")],
              "relay floor", "push floor", "push % of floor", *[f"fwd tok/s b{b}" for b in args.batches]]
    print(" | ".join(header))
    for name, r in results.items():
        first = r[f"push_decode_{args.contexts[0]}_steps_s"]
        print(" | ".join([name, *[f"{r[f'{m}_decode_{c}_steps_s']:.2f}" for c in args.contexts for m in ("relay", "push")],
                          f"{r['relay_floor_steps_s']:.2f}", f"{r['push_floor_steps_s']:.2f}",
                          f"{100 * first / r['push_floor_steps_s']:.0f}%", *[f"{r[c]:.1f}" for c in fwd_cols]]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": str(date.today()), "local_step_s": step_s, **results}, indent=2))


if __name__ == "__main__":
    main()
