"""The bus alone on loopback: round-trip latency, throughput, and the codecs on real hidden states.

    python perf/bench_bus.py [--json perf/out/bench_bus.json]

An echo server (a real ROUTER socket, in a separate process so the two sides do
not share a GIL) answers each `forward` with the tensor it got; the client is the
same DEALER Connection the model client uses. Codec figures use SmolLM2-135M's
real hidden states (128 tokens, after blocks 1, 15 and 29).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from perf.bench_codecs import bench_codecs, format_table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SERVER = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.bus_helpers import echo
from corolla.bus.server import Server
async def main():
    server = Server(echo, "tcp://127.0.0.1:0", max_bytes=1 << 30)
    print(server.endpoint, flush=True)
    await server.serve()
asyncio.run(main())
"""


async def _round_trips(endpoint: str, tensor: torch.Tensor, n: int) -> list[float]:
    from corolla.bus.client import BusLoop, Connection
    from corolla.bus.messages import Forward
    conn = Connection(endpoint, BusLoop.get().context)
    times = []
    try:
        for _ in range(n + 3):
            start = time.perf_counter()
            await conn.request(Forward(tensor, 0, 1), 30.0)
            times.append(time.perf_counter() - start)
    finally:
        await conn.close()
    return sorted(times[3:])


def _pct(times: list[float], q: float) -> float:
    return times[min(len(times) - 1, int(q * len(times)))]


def real_hidden_states() -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.models.convert import convert
    folder = convert()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = ("The quick brown fox jumps over the lazy dog. " * 40)
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return [(f"SmolLM2 after block {i}", hs[i + 1]) for i in (1, 15, 29)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="perf/out/bench_bus.json")
    parser.add_argument("--n-small", type=int, default=2000)
    parser.add_argument("--n-large", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from corolla.bus.client import BusLoop

    root = str(Path(__file__).resolve().parent.parent)
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(root=root)], stdout=subprocess.PIPE, text=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
               "date": str(date.today())}
    try:
        endpoint = server.stdout.readline().strip()
        bus = BusLoop.get()
        small = torch.randn(4096)  # 16 KiB
        large = torch.randn(4 << 20)  # 16 MiB
        t_small = bus.run(_round_trips(endpoint, small, args.n_small))
        t_large = bus.run(_round_trips(endpoint, large, args.n_large))
    finally:
        server.terminate()
        server.wait()
    results["rtt_16KiB_us"] = {"p50": _pct(t_small, 0.5) * 1e6, "p99": _pct(t_small, 0.99) * 1e6}
    results["rtt_16MiB_ms"] = {"p50": _pct(t_large, 0.5) * 1e3, "p99": _pct(t_large, 0.99) * 1e3}
    # each round trip moves the tensor twice (there and back)
    results["throughput_16MiB_GBps"] = 2 * large.nbytes / _pct(t_large, 0.5) / 1e9
    print(f"bus on loopback ({results['machine']}, {results['date']})")
    print(f"  16 KiB round trip: p50 {results['rtt_16KiB_us']['p50']:.0f} us, p99 {results['rtt_16KiB_us']['p99']:.0f} us"
          f"   (target p50 < 200 us)")
    print(f"  16 MiB round trip: p50 {results['rtt_16MiB_ms']['p50']:.1f} ms, p99 {results['rtt_16MiB_ms']['p99']:.1f} ms")
    print(f"  16 MiB throughput: {results['throughput_16MiB_GBps']:.2f} GB/s   (target >= 1 GB/s)")
    results["codecs"] = {}
    for label, hidden in real_hidden_states():
        rows = bench_codecs(hidden, label)
        results["codecs"][label] = rows
        print(f"\n{label} (max |x| = {hidden.abs().max():.0f})")
        print(format_table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
