"""A swarm that grows while it serves: single-stream decode after each worker joins, on emulated networks.

    sudo .venv/bin/python perf/bench_growth.py [--network loopback lan-1g lan-100m wan-100m-100ms]
                                               [--joins 0:15 15:30 0:30 10:20] [--json PATH]

bench_network.py serves the model over fixed chains of 1, 2 and 3 workers, so
on a 100 ms link each extra worker is an extra hop and its delay. Here workers
join one swarm one by one, as people add machines to a private swarm: each
announces its span by gossip (the first worker is every other's and the
client's initial peer), and each on its own host behind the profile's shaped,
delayed link (perf/netem.py). Once the joined workers cover every block, and
again after each further join, a fresh client on its own host learns the swarm
by gossip, lets latency routing choose its chain (client/routing.py: measured
round trips plus announced compute), and decodes. Printed per stage: the spans
up, the chain the session ran on, decode steps/s, and its ratio to the stage
before. The default joins first cover the model with two halves, then add a
worker of all 30 blocks (one hop instead of two: a 100 ms link should speed up),
then one of blocks 10:20 (no better chain: nothing should slow down).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

# Set before torch loads OpenMP: up to 4 workers and the client share this machine's cores (see bench_network.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from perf import netem  # noqa: E402
from perf.bench_network import (client_figures, decode_steps_per_s, link_record, link_text, start_relay,  # noqa: E402
                                warm_up)

log = logging.getLogger("bench_growth")

WORKER_PORT = 7001  # behind a delay each worker has its own namespace, so one port number serves them all
DISCOVERY_TIMEOUT_S = 30.0


def client_run(args) -> None:
    """Inside the client's namespace: join by gossip, wait to know every worker up, decode, print one JSON line."""
    torch.set_num_threads(args.threads)
    from corolla import AutoDistributedModelForCausalLM
    from corolla.bus.client import BusLoop

    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=[args.peer])
    router = model.remote_layers.router

    async def known() -> int:
        return len(router.candidates())

    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while BusLoop.get().run(known()) < args.expect:
        if time.monotonic() > deadline:
            raise SystemExit(f"the client learned only {BusLoop.get().run(known())} of {args.expect} workers")
        time.sleep(0.2)
    with torch.inference_mode():
        warm_up(model)
        with model.inference_session(max_length=args.context + args.tokens * args.repeats + 2) as session:
            rate = decode_steps_per_s(model, args.context, args.tokens, args.repeats)
            chain = session.chain
    print(json.dumps({"steps_s": rate, "chain": chain}), flush=True)


def start_worker(topo: netem.Topology, host: str, folder: str, span: str, peer: str | None, threads: int):
    """A worker on `host`; behind a delay, bound to the host's loopback with a relay on its address in front, and
    announcing that address, so the client and other workers all reach it through the delay."""
    from corolla.worker.launcher import spawn_worker
    relay = None
    flags = ["--model", folder, "--blocks", span, "--no-mdns", "--threads", str(threads),
             *(["--initial-peers", peer] if peer else [])]
    if topo.profile.delay_ms:
        relay, _ = start_relay(topo, host, WORKER_PORT, listen_port=WORKER_PORT)
        flags += ["--host", "127.0.0.1", "--port", str(WORKER_PORT), "--public-host", topo.addr(host)]
    else:
        flags += ["--host", topo.addr(host), "--port", "0"]
    ns = topo.netns(host)
    worker = spawn_worker(*flags, prefix=["ip", "netns", "exec", ns] if ns else None).wait_ready(180)
    endpoint = f"tcp://{topo.addr(host)}:{WORKER_PORT}" if relay else worker.endpoint
    return worker, endpoint


def covered(spans: list[str], num_blocks: int) -> bool:
    blocks = set()
    for span in spans:
        a, b = map(int, span.split(":"))
        blocks.update(range(a, b))
    return blocks == set(range(num_blocks))


def run_profile(name: str, folder: str, num_blocks: int, args) -> dict:
    hosts = [f"w{i + 1}" for i in range(len(args.joins))]
    with netem.Topology([*hosts, "client"], name) as topo:
        link = netem.measure(topo, "client", "w1", max_seconds=2.0) if topo.netns("client") else None
        log.info("%s: link measured: %s", name, link or "loopback (no shaping)")
        workers, names, stages, seed = [], {}, [], None
        try:
            for k, (host, span) in enumerate(zip(hosts, args.joins)):
                worker, endpoint = start_worker(topo, host, folder, span, seed, args.threads)
                workers.append(worker)
                seed = seed or endpoint
                names[endpoint] = host
                log.info("%s: %s joined with blocks %s", name, host, span)
                up = args.joins[:k + 1]
                if not covered(up, num_blocks):
                    continue
                argv = [sys.executable, __file__, "_client", "--model", folder, "--peer", seed, "--expect",
                        str(len(up)), "--threads", str(args.threads), "--context", str(args.context),
                        "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
                out = client_figures(topo, argv, 1800, f"on {name} with workers {up}")
                chain = [f"{names.get(endpoint, endpoint)} {a}:{b}" for endpoint, a, b in out["chain"]]
                stages.append({"workers": up, "chain": chain, "steps_s": out["steps_s"]})
                log.info("%s: %d workers up, chain %s: %.2f steps/s", name, len(up), " -> ".join(chain),
                         out["steps_s"])
        finally:
            for worker in workers:
                worker.stop()
    return {"link": link_record(link), "stages": stages}


def print_table(results: dict) -> None:
    print(f"\n{results['model']}, decode after a {results['args']['context']}-token prompt; {results['machine']}; "
          f"{results['date']}")
    print(f"{'profile':16} {'workers up (w1 w2 ...)':32} {'chain chosen: worker blocks':40} {'steps/s':>8} "
          f"{'vs before':>10}")
    for name, prof in results["profiles"].items():
        print(f"-- {name}: {link_text(prof['link'])}")
        before = None
        for stage in prof["stages"]:
            ratio = f"{stage['steps_s'] / before:10.2f}" if before else f"{'':>10}"
            print(f"{name:16} {' '.join(stage['workers']):32} {' -> '.join(stage['chain']):40} "
                  f"{stage['steps_s']:8.2f} {ratio}")
            before = stage["steps_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_client"])
    parser.add_argument("--network", nargs="+", default=["loopback", "lan-1g", "lan-100m", "wan-100m-100ms"],
                        choices=list(netem.PROFILES))
    parser.add_argument("--joins", nargs="+", default=["0:15", "15:30", "0:30", "10:20"],
                        help="spans of the workers, in the order they join")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before decode")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows of --tokens steps; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the client and of each worker")
    parser.add_argument("--model")
    parser.add_argument("--peer")
    parser.add_argument("--expect", type=int)
    parser.add_argument("--json", default="perf/results/growth.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode == "_client":
        return client_run(args)
    netem.require_profiles(args.network, "bench_growth")
    from transformers import AutoConfig

    from corolla.models.convert import convert
    folder = str(convert())
    num_blocks = AutoConfig.from_pretrained(folder, local_files_only=True).num_hidden_layers
    for span in args.joins:
        a, _, b = span.partition(":")
        if not (a.isdigit() and b.isdigit() and 0 <= int(a) < int(b) <= num_blocks):
            sys.exit(f"bench_growth: {span!r} is not a span start:end of the model's {num_blocks} blocks")
    if not covered(args.joins, num_blocks):
        sys.exit(f"bench_growth: the joins {' '.join(args.joins)} never cover all {num_blocks} blocks")
    started = time.perf_counter()
    results = {"model": f"{Path(folder).name} ({num_blocks} blocks)", "date": str(date.today()),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{args.threads} threads per process",
               "args": {k: v for k, v in vars(args).items() if k not in ("mode", "model", "peer", "expect")},
               "profiles": {}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.network:
        results["profiles"][name] = run_profile(name, folder, num_blocks, args)
        out.write_text(json.dumps(results, indent=2))  # a partial run keeps what it measured
        log.info("%s done (%.0f s so far)", name, time.perf_counter() - started)
    print_table(results)
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
