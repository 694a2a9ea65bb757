"""Worker-side batching of decode steps, on vs off: N sessions generating at once through one swarm.

    python perf/bench_batching.py [--sessions 1 4 8 16] [--new-tokens 32] [--threads 1] [--json PATH]

SmolLM2-135M on 2 worker processes on loopback (blocks 0:15 and 15:30), started
twice side by side: with the default max_decode_batch (steps of different
sessions queued together run as one pass) and with max_decode_batch 1 (each step
alone); each N runs on both back to back. For each N, N threads of one client
process each run transformers' generate() in its own inference session, greedy,
from prompts of different lengths. Decode tokens/s
count the tokens after each session's first (prefill excluded): aggregate over
the window from the first session's first token to the last token of any, and
per session over its own decode. "batched" is the share of the workers' steps
that ran in a pass with other sessions' steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("bench_batching")


class TokenClock:
    """A generate() streamer that notes when each new token arrives (its first call carries the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_sessions(model, prompts: list[torch.Tensor], new_tokens: int) -> dict:
    clocks = [TokenClock() for _ in prompts]
    start = threading.Barrier(len(prompts))
    errors: list[BaseException] = []

    def session(prompt, clock):
        start.wait()
        try:
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=clock)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=session, args=pair) for pair in zip(prompts, clocks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    decode = [c.times[1:] for c in clocks]  # times[0]: the prompt; times[1]: the first new token, after prefill
    window = max(d[-1] for d in decode) - min(d[0] for d in decode)
    per_session = [(len(d) - 1) / (d[-1] - d[0]) for d in decode]
    return {"aggregate_tok_s": sum(len(d) - 1 for d in decode) / window,
            "session_steps_s": sum(per_session) / len(per_session)}


def batched_share(endpoints: list[str], before: list[int], steps: int) -> float:
    return sum(after - b for after, b in zip(worker_counts(endpoints), before)) / steps


def worker_counts(endpoints: list[str]) -> list[int]:
    from corolla.bus.client import BusLoop, Connection
    from corolla.bus.messages import InfoRequest

    bus = BusLoop.get()

    async def ask(endpoint):
        conn = Connection(endpoint, bus.context)
        try:
            return (await conn.request(InfoRequest(), 10.0)).extra["batched_steps"]
        finally:
            await conn.close()

    return [bus.run(ask(e)) for e in endpoints]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker and of the client")
    parser.add_argument("--json", default="perf/out/bench_batching.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm

    folder = str(convert())
    vocab = 49152
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (1, 8 + 4 * (i % 8)), generator=generator) for i in range(max(args.sessions))]
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as config_dir, ExitStack() as stack:
        off = Path(config_dir) / "off.yaml"
        off.write_text("max_decode_batch: 1\n")
        models, endpoints = {}, {}
        for mode, extra in (("on", []), ("off", ["--config", str(off)])):
            worker_args = [["--model", folder, "--blocks", span, "--threads", str(args.threads), "--no-mdns", *extra]
                           for span in ("0:15", "15:30")]
            log.info("batching %s: starting 2 workers", mode)
            endpoints[mode] = stack.enter_context(LocalSwarm(worker_args)).endpoints
            models[mode] = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=endpoints[mode])
        with torch.inference_mode():
            for model in models.values():
                model.generate(prompts[0], max_new_tokens=2, do_sample=False)  # warm-up: connections, routing
            for n in args.sessions:
                for mode in ("off", "on"):  # back to back, so both see the same machine
                    before = worker_counts(endpoints[mode])
                    figures = run_sessions(models[mode], prompts[:n], args.new_tokens)
                    steps = 2 * n * (args.new_tokens - 1)  # decode steps, on each of the 2 workers
                    figures["batched"] = batched_share(endpoints[mode], before, steps)
                    results.setdefault(mode, {})[n] = figures
                    log.info("batching %-3s %2d sessions: %7.1f tok/s aggregate, %5.1f steps/s per session, "
                             "%3.0f%% of steps batched", mode, n, figures["aggregate_tok_s"],
                             figures["session_steps_s"], 100 * figures["batched"])

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s) each"
    print(f"\nSmolLM2-135M on 2 workers on loopback, {args.new_tokens} new tokens per session, greedy; {machine}; "
          f"{date.today()}")
    print(f"{'sessions':>8} | {'aggregate tok/s':^25} | {'steps/s per session':^25} | {'batched':>7}")
    print(f"{'':>8} | {'off':>7} {'on':>7} {'ratio':>9} | {'off':>7} {'on':>7} {'ratio':>9} | {'on':>7}")
    for n in args.sessions:
        on, off_ = results["on"][n], results["off"][n]
        print(f"{n:8d} | {off_['aggregate_tok_s']:7.1f} {on['aggregate_tok_s']:7.1f} "
              f"{on['aggregate_tok_s'] / off_['aggregate_tok_s']:8.2f}x | {off_['session_steps_s']:7.1f} "
              f"{on['session_steps_s']:7.1f} {on['session_steps_s'] / off_['session_steps_s']:8.2f}x | "
              f"{100 * on['batched']:6.0f}%")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "date": str(date.today()), "args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
