"""Petals' benchmark table on emulated networks, over chains of 1, 2 and 3 workers.

    sudo .venv/bin/python perf/bench_network.py --json perf/results/network.json   # ~17 min on 2 cores
    .venv/bin/python perf/plots.py perf/results/network.json                       # PNGs under perf/plots/

Each profile builds hosts as network namespaces joined by shaped veth links
(perf/netem.py: tbf for bandwidth, a delaying relay for latency), measures the
client-to-worker link (RTT, throughput) and prints it beside the results. The
same SmolLM2-135M (30 blocks) is then served by 1, 2 and 3 workers (0:30;
15+15; 10+10+10 blocks), each worker on its own host, and a client on another
host measures through the chain, relayed by the client and with
server-to-server push:

* single-batch decode steps/s after a prompt of 128 and of 2048 tokens;
* parallel forward tokens/s at batch 1 and 64 (128 tokens each), with the
  client's pipelined micro-batches on (automatic) and off (micro_batches=1).

Each decode row has its floor: 1 / (one local decode step at that context +
the links' delay), relay paying a round trip per worker, push one one-way
delay per link plus the return, so a longer chain has a lower floor only by
its extra link delay. Local figures come from the same model in one process.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

# Set before torch loads OpenMP. Up to 3 workers and the client share this machine's cores: spinning OpenMP threads
# would cost the process computing many times over (worker/launcher.py), and the client and the local baseline must
# compute under the workers' policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from perf import netem  # noqa: E402
from perf.bench_inference import forward_tokens_per_s  # noqa: E402

log = logging.getLogger("bench_network")

FORWARD_SEQ = 128
REQUEST_TIMEOUT_S = 300.0  # a batch-64 forward on a loaded 2-core machine takes tens of seconds


class _Clock(LogitsProcessor):
    """Marks when each new token's logits arrive: consecutive marks are one decode step apart."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def __call__(self, input_ids, scores):
        self.marks.append(time.perf_counter())
        return scores


def decode_steps_per_s(model, context: int, tokens: int, repeats: int) -> float:
    """Decode steps/s after a `context`-token prompt: the fastest of `repeats` windows of `tokens` steps in one
    generate(), timed from the prefill's token on, so a long prompt is paid once (2048 tokens cost seconds on a
    CPU) and a burst of load elsewhere spoils one window, not the figure."""
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    clock = _Clock()
    steps = tokens * repeats
    model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                   logits_processor=LogitsProcessorList([clock]))
    return tokens / min(clock.marks[i + tokens] - clock.marks[i] for i in range(0, steps, tokens))


def warm_up(model) -> None:
    """First-call costs (connections, routing, allocator) are not decode."""
    model.generate(torch.zeros(1, 8, dtype=torch.long), max_new_tokens=2, min_new_tokens=2, do_sample=False)


# client options per forward column: pipelined micro-batches as by default, and off
FORWARD_VARIANTS = {"auto": {}, "1": {"micro_batches": 1}}


def client_run(args) -> None:
    """Inside the client's namespace: measure through the given chain, log progress, print one JSON line."""
    torch.set_num_threads(args.threads)
    from corolla import AutoDistributedModelForCausalLM

    def load(**options):
        return AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peers, routing="static",
                                                               request_timeout=REQUEST_TIMEOUT_S, **options)

    out = {"decode": {}, "forward": {}}
    with torch.inference_mode():
        for mode, push in (("relay", False), ("push", True)):
            model = load(use_server_to_server=push)
            warm_up(model)
            out["decode"][mode] = {}
            for ctx in args.contexts:
                out["decode"][mode][str(ctx)] = decode_steps_per_s(model, ctx, args.tokens, args.repeats)
                log.info("  %s decode, %d ctx: %.2f steps/s", mode, ctx, out["decode"][mode][str(ctx)])
            del model
        for variant, options in FORWARD_VARIANTS.items():
            model = load(**options)  # stateless forwards never push
            out["forward"][variant] = {}
            for batch in args.batches:
                rate = forward_tokens_per_s(model, batch, FORWARD_SEQ, 1, model.config.vocab_size)
                out["forward"][variant][str(batch)] = rate
                log.info("  forward batch %d, micro_batches=%s: %.0f tokens/s", batch, variant, rate)
            del model
    print(json.dumps(out), flush=True)


def local_figures(folder: str, args) -> dict:
    """The same model in this process: decode steps/s per context (the floors' compute) and forward tokens/s."""
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    out = {"decode_steps_s": {}, "forward_tok_s": {}}
    with torch.inference_mode():
        warm_up(model)
        for ctx in args.contexts:
            out["decode_steps_s"][str(ctx)] = decode_steps_per_s(model, ctx, args.tokens, args.repeats)
            log.info("local decode, %d ctx: %.2f steps/s", ctx, out["decode_steps_s"][str(ctx)])
        for batch in args.batches:
            out["forward_tok_s"][str(batch)] = forward_tokens_per_s(model, batch, FORWARD_SEQ, 1,
                                                                    model.config.vocab_size)
            log.info("local forward batch %d: %.0f tokens/s", batch, out["forward_tok_s"][str(batch)])
    del model
    gc.collect()
    return out


def spans(num_blocks: int, workers: int) -> list[str]:
    """Contiguous, as even as can be: 30 blocks over 3 workers are 0:10, 10:20, 20:30."""
    edges = [round(i * num_blocks / workers) for i in range(workers + 1)]
    return [f"{a}:{b}" for a, b in zip(edges, edges[1:])]


def floors(local_decode: dict, workers: int, rtt_s: float) -> dict:
    """Steps/s the links allow at each context: relay pays a round trip per worker, push one one-way delay per
    link (client, each worker in turn, back to the client)."""
    return {"relay": {ctx: 1.0 / (1.0 / rate + workers * rtt_s) for ctx, rate in local_decode.items()},
            "push": {ctx: 1.0 / (1.0 / rate + (workers + 1) * rtt_s / 2) for ctx, rate in local_decode.items()}}


def start_relay(topo: netem.Topology, host: str, port: int, listen_port: int = 0) -> tuple[subprocess.Popen, int]:
    """A delaying relay in the worker's own namespace on its public address, so the client and the other workers
    (server-to-server pushes) all reach it through the delay; returns the relay and its port (listen_port 0: any)."""
    relay = topo.popen(host, [sys.executable, str(netem.RELAY_SCRIPT), "--listen", f"{topo.addr(host)}:{listen_port}",
                              "--target", f"127.0.0.1:{port}", "--delay-ms", str(topo.profile.delay_ms),
                              "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    line = relay.stdout.readline()
    if not line.startswith("LISTENING "):
        raise RuntimeError(f"relay on {host} did not start: {line!r}")
    return relay, int(line.split()[1].rpartition(":")[2])


def run_chain(topo: netem.Topology, folder: str, chain: list[str], args) -> dict:
    """Serve the model over len(chain) workers, one host each, and run the client's measurements through them."""
    from corolla.worker.launcher import spawn_worker
    delay = topo.profile.delay_ms
    hosts = [f"w{i + 1}" for i in range(len(chain))]
    workers, relays, peers = [], [], []
    started = time.perf_counter()
    try:
        for host, span in zip(hosts, chain):
            ns = topo.netns(host)
            # port 0: on loopback every host is 127.0.0.1, shared with whatever else runs on this machine
            workers.append(spawn_worker("--model", folder, "--blocks", span, "--host", "127.0.0.1" if delay else
                                        topo.addr(host), "--port", "0", "--no-mdns", "--threads", str(args.threads),
                                        prefix=["ip", "netns", "exec", ns] if ns else None))
        for host, w in zip(hosts, workers):
            w.wait_ready(180)
            if delay:
                relay, port = start_relay(topo, host, int(w.endpoint.rpartition(":")[2]))
                relays.append(relay)
                peers.append(f"tcp://{topo.addr(host)}:{port}")
            else:
                peers.append(w.endpoint)
        log.info("%s: %d worker(s) ready (%s) in %.0f s", topo.profile.name, len(chain), " ".join(chain),
                 time.perf_counter() - started)
        argv = [sys.executable, __file__, "_client", "--model", folder, "--threads", str(args.threads),
                "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches), "--peers", *peers]
        return client_figures(topo, argv, 3600, f"on {topo.profile.name} with {len(chain)} worker(s)")
    finally:
        for w in workers:
            w.stop()
        for relay in relays:
            relay.terminate()
            relay.wait(10)


def run_profile(name: str, folder: str, num_blocks: int, local: dict, args) -> dict:
    hosts = [*(f"w{i + 1}" for i in range(max(args.workers))), "client"]
    with netem.Topology(hosts, name) as topo:
        link = netem.measure(topo, "client", "w1", max_seconds=2.0) if topo.netns("client") else None
        log.info("%s: link measured: %s", name, link or "loopback (no shaping)")
        rtt_s = link.rtt_p50_ms / 1000 if link else 0.0
        chains = {}
        for n in args.workers:
            chain = spans(num_blocks, n)
            chains[str(n)] = {"spans": chain, **run_chain(topo, folder, chain, args),
                              "floor": floors(local["decode_steps_s"], n, rtt_s)}
    return {"link": link_record(link), "chains": chains}


def client_figures(topo: netem.Topology, argv: list[str], timeout: float, what: str) -> dict:
    """Run a benchmark's client command on the "client" host; its stderr (progress) passes through, and the last
    line of its stdout is its figures as JSON."""
    res = subprocess.run(topo.command("client", argv), stdout=subprocess.PIPE, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise RuntimeError(f"the client failed {what}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def link_record(link: netem.Measurement | None) -> dict | None:
    """A measured link as the results' JSON holds it (None: loopback); `link_text` prints it."""
    return {"rtt_p50_ms": link.rtt_p50_ms, "rtt_p90_ms": link.rtt_p90_ms,
            "throughput_mbit": link.throughput_mbit} if link else None


def link_text(link: dict | None) -> str:
    if link is None:
        return "loopback, unshaped"
    return f"measured rtt p50 {link['rtt_p50_ms']:.1f} ms, {link['throughput_mbit']:.1f} Mbit/s"


def print_tables(results: dict) -> None:
    """Decode and forward tables, one block of rows per profile, its measured link in the block's heading."""
    local = results["local"]
    print(f"\n{results['model']}; relay = hops relayed by the client, push = server-to-server; {results['machine']}; "
          f"{results['date']}")
    print("local, one process: " + ", ".join(
        [f"decode {v:.2f} steps/s at {c} ctx" for c, v in local["decode_steps_s"].items()]
        + [f"forward b{b} {v:.0f} tok/s" for b, v in local["forward_tok_s"].items()]))
    print("\nDecode steps/s (floor: local step + link delay; 'vs 1' = best of relay/push over the 1-worker chain's)")
    print(f"{'profile':16} {'workers':>7} {'ctx':>5} {'relay':>7} {'push':>7} {'floor r':>8} {'floor p':>8} "
          f"{'relay %':>8} {'push %':>7} {'vs 1':>6}")
    for name, prof in results["profiles"].items():
        print(f"-- {name}: {link_text(prof['link'])}")
        chains = prof["chains"]
        first = chains[min(chains, key=int)]
        for n, c in chains.items():
            for ctx in c["decode"]["relay"]:
                r, p = c["decode"]["relay"][ctx], c["decode"]["push"][ctx]
                fr, fp = c["floor"]["relay"][ctx], c["floor"]["push"][ctx]
                base = max(first["decode"]["relay"][ctx], first["decode"]["push"][ctx])
                print(f"{name:16} {n:>7} {ctx:>5} {r:7.2f} {p:7.2f} {fr:8.2f} {fp:8.2f} {100 * r / fr:7.0f}% "
                      f"{100 * p / fp:6.0f}% {max(r, p) / base:6.2f}")
    print(f"\nForward tokens/s ({FORWARD_SEQ} tokens per sequence; micro=auto pipelines micro-batches, "
          f"micro=1 does not; '/ local' = micro=auto over one process)")
    cols = [(v, b) for b in local["forward_tok_s"] for v in FORWARD_VARIANTS]
    print(f"{'profile':16} {'workers':>7} " + " ".join(f"{f'b{b} micro={v}':>15}" for v, b in cols) + " "
          + " ".join(f"{f'b{b} / local':>11}" for b in local["forward_tok_s"]))
    for name, prof in results["profiles"].items():
        for n, c in prof["chains"].items():
            fwd = c["forward"]
            print(f"{name:16} {n:>7} " + " ".join(f"{fwd[v][b]:15.0f}" for v, b in cols) + " "
                  + " ".join(f"{fwd['auto'][b] / local['forward_tok_s'][b]:11.2f}" for b in local["forward_tok_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_client"])
    parser.add_argument("--network", nargs="+", default=["loopback", "lan-1g", "lan-100m", "wan-100m-100ms"],
                        choices=list(netem.PROFILES))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 3], help="chain lengths to measure")
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 2048], help="prompt tokens before decode")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64],
                        help=f"forward batches of {FORWARD_SEQ} tokens")
    parser.add_argument("--tokens", type=int, default=16, help="decode steps timed per figure")
    parser.add_argument("--repeats", type=int, default=2, help="decode windows of --tokens steps; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the client, each worker, and local")
    parser.add_argument("--model")
    parser.add_argument("--peers", nargs="+")
    parser.add_argument("--json", default="perf/results/network.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode == "_client":
        return client_run(args)
    netem.require_profiles(args.network, "bench_network")
    from transformers import AutoConfig

    from corolla.models.convert import convert
    folder = str(convert())
    num_blocks = AutoConfig.from_pretrained(folder, local_files_only=True).num_hidden_layers
    if max(args.workers) > num_blocks:
        sys.exit(f"bench_network: {num_blocks} blocks cannot be split over {max(args.workers)} workers")
    started = time.perf_counter()
    results = {"model": f"{Path(folder).name} ({num_blocks} blocks)", "date": str(date.today()),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{args.threads} threads per process",
               "args": {k: v for k, v in vars(args).items() if k not in ("mode", "model", "peers")},
               "local": local_figures(folder, args), "profiles": {}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.network:
        t0 = time.perf_counter()
        results["profiles"][name] = run_profile(name, folder, num_blocks, results["local"], args)
        out.write_text(json.dumps(results, indent=2))  # a partial run keeps what it measured
        log.info("%s done in %.0f s (%.0f s so far)", name, time.perf_counter() - t0, time.perf_counter() - started)
    print_tables(results)
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
