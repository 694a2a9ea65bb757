"""Worker-side batching of decode steps, on vs off: N sessions generating at once through one swarm.

    python perf/bench_batching.py [--sessions 1 4 8 16] [--new-tokens 32] [--threads 1] [--json PATH]
    python perf/bench_batching.py --gpu llama3-8b [--quantization nf4]    # on a GPU machine

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

With --gpu SHAPE the workers are two halves of a random-weight model of that
shape (perf/gpu_bench.py's shapes; bf16, or --quantization) on the first GPU,
and each session is a client process of its own on that GPU (one process's
generate() threads share one GIL and cannot keep GPU workers busy: measured,
perf/RESULTS.md); the two swarms run one after the other, so that the GPU holds
one swarm and the clients (8B: 2 x 16 GB and ~2.5 GB a client; 16 sessions fit
an H200 and an H100). There "on" workers keep their batch-1 sessions in the slot
pool and step those queued together as one CUDA graph replay (worker/slots.py,
the default), "off" workers replay each session's own graph, one at a time.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("bench_batching")
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # --gpu runs everything on the first GPU


class TokenClock:
    """A generate() streamer that notes when each new token arrives (its first call carries the prompt)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(self.clock())

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
    return decode_figures([c.times for c in clocks])


def decode_figures(times: list[list[float]]) -> dict:
    """Tokens/s from each session's token times (the first: the prompt; the second: the first new token, after
    prefill): aggregate over the window of all sessions' decoding, and per session over its own."""
    decode = [t[1:] for t in times]
    window = max(d[-1] for d in decode) - min(d[0] for d in decode)
    per_session = [(len(d) - 1) / (d[-1] - d[0]) for d in decode]
    return {"aggregate_tok_s": sum(len(d) - 1 for d in decode) / window,
            "session_steps_s": sum(per_session) / len(per_session)}


def run_session_processes(shape: str, endpoints: list[str], model_id: str, n: int, new_tokens: int) -> dict:
    """N sessions, each a client process of this script (`--client`): all build their model and warm up, then
    start generating at once (a line on their standard input) and report their token times (one clock, the
    system's monotonic one)."""
    children = [subprocess.Popen([sys.executable, __file__, "--client", shape, "--endpoints", ",".join(endpoints),
                                  "--model-id", model_id, "--prompt", str(i), "--new-tokens", str(new_tokens)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(n)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a client process failed to start (exit {child.wait()})")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        times = [json.loads(child.stdout.readline()) for child in children]
        for child in children:
            child.wait(timeout=60)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return decode_figures(times)


def client_process(shape: str, endpoints: list[str], model_id: str, prompt_index: int, new_tokens: int) -> None:
    """One session of run_session_processes."""
    from perf.gpu_bench import llama_config
    config = llama_config(shape)
    model = gpu_client(config, endpoints, model_id)
    prompt = prompt_ids(prompt_index, config.vocab_size).to(DEVICE)
    clock = TokenClock(time.monotonic)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up: connections, routing, the graphs
        print("ready", flush=True)
        sys.stdin.readline()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    print(json.dumps(clock.times), flush=True)


def prompt_ids(i: int, vocab: int) -> torch.Tensor:
    """Session i's prompt: random ids, of one of eight lengths."""
    return torch.randint(0, vocab, (1, 8 + 4 * (i % 8)), generator=torch.Generator().manual_seed(i))


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


def gpu_workers(shape: str, quantization: str, folder: str) -> list[list[str]]:
    """The arguments of two GPU workers serving half each of a random-weight model of `shape` (config saved in
    `folder`)."""
    from perf.gpu_bench import SEED, llama_config

    config = llama_config(shape)
    config.save_pretrained(folder)
    half = config.num_hidden_layers // 2
    return [["--model", folder, "--blocks", span, "--device", DEVICE, "--dtype", "bfloat16", "--random-weights",
             "--seed", str(SEED), "--quantization", quantization, "--no-mdns"]
            for span in (f"0:{half}", f"{half}:{config.num_hidden_layers}")]


def gpu_client(config, endpoints: list[str], model_id: str):
    """A client with the random embeddings and head that match gpu_workers' blocks."""
    from corolla.client.config import ClientConfig
    from corolla.client.families import DistributedLlamaForCausalLM
    from perf.gpu_bench import DTYPE, random_causal_lm

    model = random_causal_lm(DistributedLlamaForCausalLM, config, DTYPE, "none", DEVICE)
    model.attach_swarm(ClientConfig(initial_peers=endpoints, wire_dtype=None), model_id)
    return model


def side_by_side(args, modes, results: dict) -> None:
    """SmolLM2 on the CPU: both swarms at once, each N run on both back to back (so both see the same machine), the
    sessions as threads of this process."""
    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm

    folder = str(convert())
    prompts = [prompt_ids(i, 49152) for i in range(max(args.sessions))]
    with ExitStack() as stack:
        models, endpoints = {}, {}
        for mode, extra in modes:
            log.info("batching %s: starting 2 workers", mode)
            worker_args = [["--model", folder, "--blocks", span, "--threads", str(args.threads), "--no-mdns", *extra]
                           for span in ("0:15", "15:30")]
            endpoints[mode] = stack.enter_context(LocalSwarm(worker_args)).endpoints
            models[mode] = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=endpoints[mode])
        with torch.inference_mode():
            for model in models.values():
                model.generate(prompts[0], max_new_tokens=2, do_sample=False)  # warm-up: connections, routing
            for n in args.sessions:
                for mode in ("off", "on"):  # back to back
                    before = worker_counts(endpoints[mode])
                    figures = run_sessions(models[mode], prompts[:n], args.new_tokens)
                    note(results, mode, n, figures, endpoints[mode], before, args.new_tokens)


def note(results: dict, mode: str, n: int, figures: dict, endpoints: list[str], before: list[int],
         new_tokens: int) -> None:
    steps = 2 * n * (new_tokens - 1)  # decode steps, on each of the 2 workers
    figures["batched"] = batched_share(endpoints, before, steps)
    results.setdefault(mode, {})[n] = figures
    log.info("batching %-3s %2d sessions: %7.1f tok/s aggregate, %5.1f steps/s per session, %3.0f%% of steps "
             "batched", mode, n, figures["aggregate_tok_s"], figures["session_steps_s"], 100 * figures["batched"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each worker and of the client")
    parser.add_argument("--json", default="perf/out/bench_batching.json")
    parser.add_argument("--gpu", choices=["llama3-8b", "llama2-70b", "tiny"],
                        help="a random-weight model of this shape on the first GPU instead of SmolLM2 on the CPU")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "nf4"], help="with --gpu")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # a session's process of --gpu: its model's shape
    parser.add_argument("--endpoints", help=argparse.SUPPRESS)
    parser.add_argument("--model-id", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_process(args.client, args.endpoints.split(","), args.model_id, args.prompt, args.new_tokens)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU")

    from corolla.worker.launcher import LocalSwarm

    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as config_dir:
        off_yaml = Path(config_dir) / "off.yaml"
        off_yaml.write_text("max_decode_batch: 1\n")
        modes = (("on", []), ("off", ["--config", str(off_yaml)]))
        if args.gpu:
            model_name = f"{args.gpu} {args.quantization}, random weights"
            workers = gpu_workers(args.gpu, args.quantization, config_dir)
            for mode, extra in modes:  # one swarm at a time: the GPU holds it and the sessions' clients
                log.info("batching %s: starting 2 workers", mode)
                with LocalSwarm([[*w, *extra] for w in workers], timeout=600.0) as swarm:
                    for n in args.sessions:
                        before = worker_counts(swarm.endpoints)
                        figures = run_session_processes(args.gpu, swarm.endpoints, Path(config_dir).name, n,
                                                        args.new_tokens)
                        note(results, mode, n, figures, swarm.endpoints, before, args.new_tokens)
        else:
            model_name = "SmolLM2-135M"
            side_by_side(args, modes, results)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s) each"
    if args.gpu:
        machine = f"{torch.cuda.get_device_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\n{model_name} on 2 workers on loopback, {args.new_tokens} new tokens per session, greedy; {machine}; "
          f"{date.today()}")
    if args.gpu:
        print("on: sessions in the slot pool, queued steps as one graph replay (the default); off: each session's own "
              "CUDA graph, one step at a time")
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
