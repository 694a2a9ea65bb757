"""Time to a new session's first token on emulated networks: a fresh client's, and a warm client's.

    sudo .venv/bin/python perf/bench_first_token.py [--network loopback wan-100m-100ms] [--workers 2] [--json PATH]

Every generate() call opens a session on each worker of its chain and closes it
at the end, so on a slow link a short reply costs more round trips than its
tokens do. The model (SmolLM2-135M) is served by --workers workers, each on its
own host behind the profile's link (perf/netem.py), and a client on another
host measures, after a 32-token prompt:

* fresh: importing corolla and `from_pretrained` ("load"), then the first
  generated token, in a new process: swarm routing (discovery by gossip from the first worker, pings to
  choose the chain), at once and after a pause of --pause seconds (a user
  writing a prompt: discovery and pings go on meanwhile), and a static chain
  (the workers listed in order);
* warm: a whole one-token generate() on a client that has generated before
  (open, prefill, close), the median of --repeats.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # several processes share this machine's cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from perf import netem  # noqa: E402
from perf.bench_growth import start_worker  # noqa: E402
from perf.bench_network import client_figures, link_record, link_text, spans  # noqa: E402

log = logging.getLogger("bench_first_token")
PROMPT_TOKENS = 32


def client_run(args) -> None:
    """Inside the client's namespace: one fresh first token, then warm one-token generations; one JSON line."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from corolla import AutoDistributedModelForCausalLM
    prompt = torch.randint(0, 1000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    options = {"routing": "static"} if args.routing == "static" else {}
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peers, **options)
    load = time.perf_counter() - started
    time.sleep(args.pause)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, do_sample=False)
        fresh = time.perf_counter() - started
        warm = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, do_sample=False)
            warm.append(time.perf_counter() - started)
    print(json.dumps({"load_s": load, "fresh_s": fresh, "warm_s": statistics.median(warm)}), flush=True)


def run_profile(name: str, folder: str, num_blocks: int, args) -> dict:
    hosts = [f"w{i + 1}" for i in range(args.workers)]
    with netem.Topology([*hosts, "client"], name) as topo:
        link = netem.measure(topo, "client", "w1", max_seconds=1.0) if topo.netns("client") else None
        log.info("%s: link measured: %s", name, link or "loopback (no shaping)")
        workers, endpoints, out = [], [], {}
        try:
            for host, span in zip(hosts, spans(num_blocks, args.workers)):
                worker, endpoint = start_worker(topo, host, folder, span, endpoints[0] if endpoints else None,
                                                args.threads)
                workers.append(worker)
                endpoints.append(endpoint)
            for variant, routing, pause, peers in (("swarm", "swarm", 0, endpoints[:1]),
                                                   ("swarm, paused", "swarm", args.pause, endpoints[:1]),
                                                   ("static", "static", 0, endpoints)):
                argv = [sys.executable, __file__, "_client", "--model", folder, "--routing", routing, "--threads",
                        str(args.threads), "--repeats", str(args.repeats), "--pause", str(pause), "--peers", *peers]
                out[variant] = client_figures(topo, argv, 600, f"on {name} ({variant})")
                log.info("%s, %s: loaded in %.2f s, then first token %.2f s; warm %.2f s", name, variant,
                         out[variant]["load_s"], out[variant]["fresh_s"], out[variant]["warm_s"])
        finally:
            for worker in workers:
                worker.stop()
    return {"link": link_record(link), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_client"])
    parser.add_argument("--network", nargs="+", default=["loopback", "wan-100m-100ms"], choices=list(netem.PROFILES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="warm one-token generations; the median counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the client and of each worker")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between loading and generating (paused)")
    parser.add_argument("--model")
    parser.add_argument("--routing", choices=["swarm", "static"])
    parser.add_argument("--peers", nargs="+")
    parser.add_argument("--json", default="perf/results/first_token.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode == "_client":
        return client_run(args)
    netem.require_profiles(args.network, "bench_first_token")
    from transformers import AutoConfig

    from corolla.models.convert import convert
    folder = str(convert())
    num_blocks = AutoConfig.from_pretrained(folder, local_files_only=True).num_hidden_layers
    if not 0 < args.workers <= num_blocks:
        sys.exit(f"bench_first_token: --workers must be 1..{num_blocks}")
    results = {"model": f"{Path(folder).name} ({num_blocks} blocks)", "date": str(date.today()),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{args.threads} threads per process", "workers": args.workers, "profiles": {}}
    for name in args.network:
        results["profiles"][name] = run_profile(name, folder, num_blocks, args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['model']} over {args.workers} workers, {PROMPT_TOKENS}-token prompt, one new token; "
          f"{results['machine']}; {results['date']}")
    print("fresh: load (import corolla, from_pretrained) + the first token after it")
    print(f"{'profile':16} {'fresh, swarm':>18} {f'after {args.pause:g} s':>12} {'fresh, static':>18} "
          f"{'warm, swarm':>12} {'warm, static':>13}")
    for name, prof in results["profiles"].items():
        swarm, static = prof["swarm"], prof["static"]
        print(f"{name:16} {swarm['load_s']:6.2f} + {swarm['fresh_s']:.2f} s {prof['swarm, paused']['fresh_s']:11.2f}s "
              f"{static['load_s']:6.2f} + {static['fresh_s']:.2f} s {swarm['warm_s']:11.2f}s {static['warm_s']:12.2f}s"
              f"   ({link_text(prof['link'])})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
