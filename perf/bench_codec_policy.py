"""Activation codecs per network: bytes, time and drift of raw fp16, lz4, int8 and the "auto" policy.

    sudo python perf/bench_codec_policy.py --network loopback lan-1g lan-100m wan-100m-100ms [--tokens 16] [--json PATH]

Per profile, a client and two workers (SmolLM2-135M, blocks 0:15 and 15:30) run on hosts joined by
shaped links (perf/netem.py, as perf/bench_network.py builds them). For each codec the client measures
  * a decode step: message bytes and time per step (a generation of N+1 tokens less one of 1 token, so
    the prompt does not count), greedy tokens equal to the local float32 model's, and the largest logit
    error against it over the steps before the first differing token;
  * a forward of 16 x 128 tokens: message bytes, time, and logit error (max abs; relative = L2 of the
    error / L2 of the local logits).
Bytes are every message of the measured work on any link (client <-> workers and the pushes between
workers), counted where each is answered: the workers' corolla_worker_bytes_total. The link is printed
beside the table twice: a bulk TCP measurement (perf/netem.py) and what the client's LinkMeter, which
"auto" decides from, measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from perf import netem  # noqa: E402

CODECS = ("raw", "lz4", "int8", "auto")
SPANS = ("0:15", "15:30")
WORKER_PORT = 31350
METRICS_OFFSET = 50
RELAY_OFFSET = 100
PROMPT_TOKENS = 128
FORWARD_SHAPE = (16, 128)


def wire_bytes(metrics_urls: list[str]) -> int:
    """Message bytes received and sent by all workers so far."""
    total = 0.0
    for url in metrics_urls:
        for line in urllib.request.urlopen(url, timeout=30).read().decode().splitlines():
            if line.startswith("corolla_worker_bytes_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def logit_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got.double() - want.double())
    return diff.abs().max().item(), (diff.norm() / want.double().norm()).item()


def client_run(args) -> None:
    """Inside the client's namespace: every codec through the given workers; prints JSON."""
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from corolla import AutoDistributedModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    vocab = local.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    batch = torch.randint(0, vocab, FORWARD_SHAPE, generator=torch.Generator().manual_seed(2))
    greedy = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        ref = local.generate(prompt, max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1, **greedy)
        ref_forward = local(batch).logits
    out = {}
    for codec in args.codecs:
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peers, routing="static",
                                                                request_timeout=300.0, codec=codec)
        with torch.inference_mode():
            model.generate(prompt[:, :8], max_new_tokens=2, do_sample=False)  # connections, links measured

            def generate(n):
                before, started = wire_bytes(args.metrics), time.perf_counter()
                res = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **greedy)
                return res, time.perf_counter() - started, wire_bytes(args.metrics) - before

            _, one_s, one_b = generate(1)
            res, all_s, all_b = generate(args.tokens + 1)
            new, want = res.sequences[0, PROMPT_TOKENS:], ref.sequences[0, PROMPT_TOKENS:]
            same = int((new == want).cumprod(0).sum())
            compared = min(same + 1, len(new))
            step_err = max(logit_errors(res.logits[i], ref.logits[i])[0] for i in range(compared))
            before, started = wire_bytes(args.metrics), time.perf_counter()
            logits = model(batch).logits
            fwd_s, fwd_b = time.perf_counter() - started, wire_bytes(args.metrics) - before
        fwd_abs, fwd_rel = logit_errors(logits, ref_forward)
        links = model.remote_layers.router.links.links
        out[codec] = {
            "step_bytes": (all_b - one_b) / args.tokens, "step_ms": 1000 * (all_s - one_s) / args.tokens,
            "tokens_equal": same, "tokens": len(new), "step_logit_max_abs": step_err,
            "forward_bytes": fwd_b, "forward_s": fwd_s, "forward_logit_max_abs": fwd_abs, "forward_logit_rel": fwd_rel,
            "links": {e: None if link is None else {"rtt_ms": 1000 * link.rtt_s, "mbit_s": link.bandwidth * 8 / 1e6}
                      for e, link in links.items()},
        }
        del model
    print(json.dumps(out))


def run_profile(name: str, folder: str, args) -> dict:
    from corolla.worker.launcher import openmp_env, spawn_worker
    env = openmp_env([["--threads", str(args.threads)]] * len(SPANS))  # the workers share this machine's cores
    with netem.Topology(["w1", "w2", "client"], name) as topo:
        link = netem.measure(topo, "client", "w1", max_seconds=2.0) if topo.netns("client") else None
        delay = netem.PROFILES[name].delay_ms
        workers, peers, metrics = [], [], []
        try:
            for host, span, port in zip(("w1", "w2"), SPANS, (WORKER_PORT, WORKER_PORT + 1)):
                ns = topo.netns(host)
                # With latency, relays in the worker's namespace hold its public address (as in bench_network.py);
                # the metrics port gets an undelayed relay so scraping it costs no round trips.
                bind = "127.0.0.1" if delay else topo.addr(host)
                workers.append(spawn_worker("--model", folder, "--blocks", span, "--host", bind, "--port", str(port),
                                            "--metrics-port", str(port + METRICS_OFFSET), "--no-mdns",
                                            "--threads", str(args.threads), "--cache-tokens", "20000", env=env,
                                            prefix=["ip", "netns", "exec", ns] if ns else None))
                public = port + RELAY_OFFSET if delay else port
                if delay:
                    for target, listen, ms in ((port, public, delay), (port + METRICS_OFFSET,
                                                                        public + METRICS_OFFSET, 0)):
                        topo.popen(host, [sys.executable, str(ROOT / "perf" / "relay.py"), "--listen",
                                          f"{topo.addr(host)}:{listen}", "--target", f"127.0.0.1:{target}",
                                          "--delay-ms", str(ms), "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
                peers.append(f"tcp://{topo.addr(host)}:{public}")
                metrics.append(f"http://{topo.addr(host)}:{public + METRICS_OFFSET}/metrics")
            for w in workers:
                w.wait_ready(180)
            argv = [sys.executable, __file__, "_client", "--model", folder, "--threads", str(args.threads),
                    "--tokens", str(args.tokens), "--codecs", *args.codecs, "--peers", *peers, "--metrics", *metrics]
            res = subprocess.run(topo.command("client", argv), capture_output=True, text=True, timeout=3600,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            if res.returncode:
                raise RuntimeError(f"client failed on {name}:\n{res.stderr[-3000:]}")
            figures = json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            for w in workers:
                w.stop()
    return {"link": str(link) if link else "loopback (no shaping)", "codecs": figures}


def print_table(results: dict, tokens: int) -> None:
    print(f"\nSmolLM2-135M over 2 workers, fp16 wire dtype, {PROMPT_TOKENS}-token prompt, {tokens} decode steps, "
          f"forward {FORWARD_SHAPE[0]} x {FORWARD_SHAPE[1]}; drift vs float32 local; {date.today()}, "
          f"{os.cpu_count()} cores")
    print("profile | codec | bytes/step | ms/step | greedy tokens equal | step max |dlogit| | fwd bytes | fwd s "
          "| fwd max |dlogit| | fwd rel err")
    for name, r in results.items():
        probed = next((c["links"] for c in r["codecs"].values() if c["links"]), {})
        seen = ", ".join(f"{e}: {v['rtt_ms']:.2f} ms, {v['mbit_s']:.0f} Mbit/s" if v else f"{e}: not measured"
                         for e, v in probed.items())
        print(f"-- {name}: {r['link']}; LinkMeter: {seen or '-'}")
        for codec, c in r["codecs"].items():
            print(" | ".join([name, codec, f"{c['step_bytes']:,.0f}", f"{c['step_ms']:.1f}",
                              f"{c['tokens_equal']}/{c['tokens']}", f"{c['step_logit_max_abs']:.2e}",
                              f"{c['forward_bytes']:,}", f"{c['forward_s']:.2f}", f"{c['forward_logit_max_abs']:.2e}",
                              f"{c['forward_logit_rel']:.1e}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "_client"])
    parser.add_argument("--network", nargs="+", default=["loopback", "lan-1g", "lan-100m", "wan-100m-100ms"],
                        choices=list(netem.PROFILES))
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model")
    parser.add_argument("--peers", nargs="+")
    parser.add_argument("--metrics", nargs="+")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.mode == "_client":
        return client_run(args)
    netem.require_profiles(args.network, "bench_codec_policy")
    from corolla.models.convert import convert
    folder = str(convert())
    results = {}
    for name in args.network:
        started = time.perf_counter()
        results[name] = run_profile(name, folder, args)
        print(f"{name}: {results[name]['link']} ({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(results, args.tokens)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": str(date.today()), **results}, indent=2))


if __name__ == "__main__":
    main()
