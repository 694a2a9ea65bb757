"""CPU workers of one chain: how their OpenMP threads wait and which cores they use, against one process.

    python perf/bench_cpu_placement.py [--variants launcher passive spin=10000 shared:passive shared:spin=10000
                                                  whole spans spans-thread]
                                       [--threads 2] [--rounds 6] [--steps 48] [--model DIR] [--json PATH]

Two workers on loopback (each half of the blocks) decode single tokens through
all blocks, relayed by a client in this process; beside them this process
computes the same blocks itself. Every variant's swarm is up at once and the
rounds alternate one process and each swarm, so a shared VM's drift moves them
alike. A variant names how the workers wait between parallel regions:

* launcher: what LocalSwarm chooses (worker/launcher.py, openmp_env);
* passive: OMP_WAIT_POLICY=PASSIVE, a thread sleeps at once;
* spin=N: GOMP_SPINCOUNT=N, a thread spins N pause loops (~100,000 a ms) first;

and "shared:" before it pins both workers to the same --threads cores (taskset),
so that they take turns on cores that never idle, as one process's threads do,
instead of each computing on cores that sat idle through the other's turn.
Three more variants split a gap between workers and one process: "whole", one
worker of all blocks (the launcher's waits): a worker's process and hops
without a second worker; "spans", this process running the workers' own span
modules (worker/loader.py) back to back on its main thread: their code without
a worker process; "spans-thread", the same on a long-lived thread of its own, as
a worker computes (worker/compute.py). Printed per variant: the median step, its ratio to one process's, and each
round's ratio; the JSON holds every round.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import shutil
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from perf.bench_inference import local_step_ms  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("bench_cpu_placement")
PROMPT_TOKENS = 128


def variant_env(wait: str) -> dict[str, str]:
    if wait == "launcher":
        return {}
    if wait == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if wait.startswith("spin="):
        return {"GOMP_SPINCOUNT": str(int(wait[5:]))}
    raise SystemExit(f"unknown variant {wait!r}: use launcher, passive, spin=N (each maybe shared:), whole, spans or "
                     "spans-thread")


def spans_step_ms(spans, hidden: torch.Tensor, steps: int) -> float:
    """Median single-token step through `spans` in turn, each on its own cache, after the prompt."""
    with torch.inference_mode():
        caches = [span.new_cache() for span in spans]
        x = hidden
        for span, cache in zip(spans, caches):
            x = span(x, cache=cache)
        times = []
        for _ in range(steps):
            started, x = time.perf_counter(), hidden[:, -1:]
            for span, cache in zip(spans, caches):
                x = span(x, cache=cache)
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


class ComputeThread:
    """A long-lived thread that runs what it is handed, as a worker's compute thread does."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, args = self._jobs.get()
            self._results.put(fn(*args))

    def __call__(self, fn, *args):
        self._jobs.put((fn, args))
        return self._results.get()


def swarm_step_ms(model, prompt: torch.Tensor, steps: int) -> float:
    with torch.inference_mode():
        hidden = model.model.embed_tokens(prompt)
        with model.model.layers.inference_session(max_length=PROMPT_TOKENS + steps + 1) as session:
            session.step(hidden)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                session.step(hidden[:, -1:])
                times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["launcher", "passive", "spin=10000", "shared:passive",
                                                          "shared:spin=10000"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each worker and of this process")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=48, help="single-token steps a round")
    parser.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct, converted on first use)")
    parser.add_argument("--json", default="perf/out/bench_cpu_placement.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cores = sorted(os.sched_getaffinity(0))
    if any(v.startswith("shared:") for v in args.variants):
        if shutil.which("taskset") is None:
            raise SystemExit("shared: variants need taskset (util-linux)")
        if args.threads > len(cores):
            raise SystemExit(f"--threads {args.threads} exceeds this machine's {len(cores)} cores")

    from transformers import AutoModelForCausalLM

    from corolla import AutoDistributedModelForCausalLM
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm

    folder = args.model or str(convert())
    local = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = torch.randint(0, local.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    half, blocks = local.config.num_hidden_layers // 2, local.config.num_hidden_layers
    spans = (f"0:{half}", f"{half}:{blocks}")

    def worker(span: str) -> list[str]:
        return ["--model", folder, "--blocks", span, "--threads", str(args.threads), "--no-mdns"]

    worker_args = [worker(span) for span in spans]
    shared_cores = ",".join(map(str, cores[:args.threads]))
    swarms, remotes, in_process = {}, {}, {}
    if {"spans", "spans-thread"} & set(args.variants):
        from corolla.worker.loader import load_span
        modules = [load_span(folder, *map(int, span.split(":")), progress=False) for span in spans]
        with torch.inference_mode():
            hidden = local.model.embed_tokens(prompt)
        thread = ComputeThread()
        in_process = {"spans": lambda: spans_step_ms(modules, hidden, args.steps),
                      "spans-thread": lambda: thread(spans_step_ms, modules, hidden, args.steps)}
        in_process = {k: v for k, v in in_process.items() if k in args.variants}
    try:
        for variant in args.variants:
            if variant in in_process:
                continue
            if variant == "whole":
                log.info("starting 1 worker of all blocks")
                swarms[variant] = LocalSwarm([worker(f"0:{blocks}")])
            else:
                wait = variant.removeprefix("shared:")
                prefix = ["taskset", "-c", shared_cores] if variant.startswith("shared:") else None
                log.info("starting 2 workers: %s", variant)
                swarms[variant] = LocalSwarm(worker_args, env=variant_env(wait), prefix=prefix)
            remotes[variant] = AutoDistributedModelForCausalLM.from_pretrained(
                folder, initial_peers=swarms[variant].endpoints, wire_dtype=torch.float16, use_server_to_server=False)
            swarm_step_ms(remotes[variant], prompt, 2)  # warm-up: connections, routing
        rounds: dict[str, list[float]] = {"one process": [], **{v: [] for v in args.variants}}
        for r in range(args.rounds):
            rounds["one process"].append(local_step_ms(local, prompt, args.steps))
            for variant in args.variants:
                rounds[variant].append(in_process[variant]() if variant in in_process
                                       else swarm_step_ms(remotes[variant], prompt, args.steps))
            log.info("round %d of %d: %s", r + 1, args.rounds,
                     ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in rounds.items()))
    finally:
        for swarm in swarms.values():
            swarm.stop()

    machine = f"{platform.machine()}, {len(cores)} cores, torch {torch.__version__}, {args.threads} threads"
    print(f"\n{Path(folder).name}: single-token steps through all blocks, {args.rounds} rounds of {args.steps}; "
          f"2 workers on loopback, relayed; {machine}; {date.today()}")
    print(f"{'':20} {'median ms':>10} {'ratio':>7}   rounds (one process / this)")
    base = statistics.median(rounds["one process"])
    for name, times in rounds.items():
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(rounds["one process"], times))
        print(f"{name:20} {statistics.median(times):10.1f} {base / statistics.median(times):7.2f}   {per_round}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "date": str(date.today()), "args": vars(args),
                               "shared_cores": shared_cores, "step_ms_rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
