"""What a user asks of a swarm under faults: how many were survived, how long each stalled, what was lost.

    python perf/bench_faults.py [--tokens 64] [--hostile 2000]

Scenarios, each on a fresh local swarm of SmolLM2-135M workers (blocks 0:15 twice and 15:30):
a worker of the chain killed with SIGKILL mid-generation, a worker stalled with
SIGSTOP (the client's request timeout is 2 s), and the only worker of a span
restarted at the same address. Each generation is compared token by token with
a fault-free run. Then hostile requests against a live worker, and many
sessions against a small cache budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch
import zmq
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _After(BaseStreamer):
    def __init__(self, n, action):
        self.n, self.action, self.seen, self.fired_at = n, action, -1, None

    def put(self, value):
        self.seen += 1
        if self.seen == self.n:
            self.fired_at = time.perf_counter()
            self.action()

    def end(self):
        pass


def _args(folder, span, *extra):
    return ["--model", folder, "--blocks", span, "--threads", "1", *extra]


def generate(folder, peers, prompt, tokens, fault=None, **client):
    from corolla import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=peers, **client)
    with model.inference_session(max_length=prompt.shape[1] + tokens) as session:
        streamer = _After(8, lambda: fault(session)) if fault else None
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=streamer)
        return out, time.perf_counter() - start, session.recoveries


def fault_scenarios(folder, prompt, tokens):
    from corolla.worker.launcher import LocalSwarm, start_worker
    rows = []
    for name in ("kill -9", "SIGSTOP", "restart"):
        spans = ["0:15", "15:30"] if name == "restart" else ["0:15", "15:30", "0:15"]
        with LocalSwarm([_args(folder, s) for s in spans]) as swarm:
            reference, clean_s, _ = generate(folder, swarm.endpoints, prompt, tokens, request_timeout=2.0)
            stopped = []

            def fault(session, name=name):
                hop = session._hops[-1] if name == "restart" else session._hops[0]
                worker = next(w for w in swarm.workers if w.endpoint == hop.endpoint)
                if name == "SIGSTOP":
                    os.kill(worker.process.pid, signal.SIGSTOP)
                    stopped.append(worker)
                    return
                worker.process.send_signal(signal.SIGKILL)
                worker.process.wait()
                if name == "restart":
                    port = hop.endpoint.rsplit(":", 1)[1]
                    swarm.workers.append(start_worker(*_args(folder, f"{hop.start}:{hop.end}", "--port", port)))

            try:
                out, fault_s, recoveries = generate(folder, swarm.endpoints, prompt, tokens, fault, request_timeout=2.0)
            finally:
                for w in stopped:
                    os.kill(w.process.pid, signal.SIGCONT)
        lost = int((out[0, -tokens:] != reference[0, -tokens:]).sum()) if out.shape == reference.shape else tokens
        rows.append({"fault": name, "survived": lost == 0, "recoveries": recoveries,
                     "stall_s": fault_s - clean_s, "tokens_lost": lost})
        print(f"  {name:8} survived={lost == 0}  recoveries={recoveries}  stall {fault_s - clean_s:5.2f} s  "
              f"tokens lost {lost}")
    return rows


def hostile(folder, cases):
    from hypothesis import HealthCheck, given, settings

    from corolla.bus import wire
    from corolla.bus.messages import ErrorReply
    from corolla.worker.launcher import LocalSwarm
    from tests.test_hostile import _cases
    counts = {"sent": 0, "answered": 0, "error_codes": 0}
    with LocalSwarm([_args(folder, "0:15", "--max-length", "256")]) as swarm:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.connect(swarm.endpoints[0])

        @settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(frames=_cases)
        def throw(frames):
            counts["sent"] += 1
            sock.send_multipart(frames)
            env = wire.decode(sock.recv_multipart())
            counts["answered"] += 1
            counts["error_codes"] += isinstance(env.message, ErrorReply)

        throw()
        counts["worker_alive"] = swarm.workers[0].process.poll() is None
        sock.close(0)
    print(f"  hostile requests: {counts['sent']} sent, {counts['answered']} answered "
          f"({counts['error_codes']} with an error code), worker alive: {counts['worker_alive']}")
    return counts


def sessions_under_budget(folder, prompt, sessions=16, slots=8, tokens=8):
    from corolla import AutoDistributedModelForCausalLM
    from corolla.worker.launcher import LocalSwarm
    length = prompt.shape[1] + tokens
    with LocalSwarm([_args(folder, s, "--cache-tokens", str(slots * length)) for s in ("0:15", "15:30")]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.endpoints, max_retries=20)
        reference = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        outs, refused, errors = [], [], []

        def run():
            try:
                with model.remote_layers.inference_session(length) as s:
                    outs.append(model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens,
                                               do_sample=False, session=s))
                    refused.append(s.recoveries)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(sessions)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    same = sum(torch.equal(o, reference) for o in outs)
    print(f"  {sessions} sessions on a budget of {slots}: {same} completed identical, "
          f"{sum(1 for r in refused if r)} were refused at first and retried, {len(errors)} failed")
    return {"sessions": sessions, "budget_sessions": slots, "identical": same,
            "refused_then_retried": sum(1 for r in refused if r), "failed": len(errors)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hostile", type=int, default=2000)
    parser.add_argument("--json", default="perf/out/bench_faults.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from corolla.models.convert import convert
    folder = str(convert())
    prompt = AutoTokenizer.from_pretrained(folder)("A cat sat", return_tensors="pt").input_ids
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {date.today()}"
    print(f"faults on SmolLM2-135M, {args.tokens} tokens per generation ({machine})")
    results = {"machine": machine, "faults": fault_scenarios(folder, prompt, args.tokens)}
    results["hostile"] = hostile(folder, args.hostile)
    results["sessions"] = sessions_under_budget(folder, prompt)
    lost = sum(r["tokens_lost"] for r in results["faults"])
    print(f"total: {len(results['faults'])} faults injected, "
          f"{sum(r['survived'] for r in results['faults'])} survived, tokens lost: {lost}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
