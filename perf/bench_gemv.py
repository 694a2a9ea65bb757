"""Batch-1 matrix-vector kernels at Llama shapes on a GPU: the decode step's inner loop.

A single-stream decode step reads every weight once, so each linear layer's
matrix-vector product should run at the GPU's memory bandwidth. This measures,
per layer shape and over a whole block's linears (several blocks' worth of
distinct weights, so nothing is served from L2), the effective bandwidth of:

- bf16: cuBLAS through F.linear (what eager transformers runs);
- nf4-bnb: bitsandbytes' 4-bit inference kernel (bitsandbytes' own layers);
- nf4: Corolla's kernel (worker/nf4_gemv.py), through the nf4 layers workers
  load (worker/quantize.py), on the same packed weights.

The nf4 time per block, times the blocks of a 70B model, is most of the time
of an nf4 worker's token: this is where a faster 4-bit kernel shows. Each nf4
method's outputs are checked against the dequantized weights in float32 (the
run fails beyond NF4_REL_TOLERANCE). --sweep times each configuration of
Corolla's kernel on each layer shape alone, to choose them.

Every method runs inside a CUDA graph, timed with CUDA events. Run on a GPU:
    python perf/bench_gemv.py --json gemv.json
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corolla.worker import nf4_gemv  # noqa: E402
from corolla.worker.quantize import NF4, quantize_linears, weight_bytes  # noqa: E402
from perf.gpu_bench import copy_bandwidth  # noqa: E402

log = logging.getLogger("bench_gemv")

SHAPES = {  # (out_features, in_features) of one block's linears: q, k, v, o, gate, up, down
    "llama2-70b": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192),
                   (8192, 28672)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096),
                  (4096, 14336)],
}
METHODS = ("bf16", "nf4-bnb", "nf4")
NF4_REL_TOLERANCE = 1e-2  # bf16 inputs and outputs, float32 sums: ~3e-3 expected
SWEEP_BYTES = 1 << 30  # distinct weights per shape in a sweep, far beyond L2
SWEEP_CONFIGS = [nf4_gemv.KernelConfig(unroll, warps, persistent)
                 for unroll, warps, persistent in itertools.product((1, 2, 3, 4), (4, 8, 16), (False, True))]


def layers(shapes: list[tuple[int, int]], blocks: int, device: torch.device) -> list[nn.Linear]:
    torch.manual_seed(0)
    out = []
    for _ in range(blocks):
        for n, k in shapes:
            linear = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            nn.init.normal_(linear.weight, std=0.02)
            out.append(linear)
    return out


def graph_time(fn, x: torch.Tensor, replays: int = 50) -> float:
    """Seconds per call of fn(x) replayed as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def run_all(layers: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer on (the leading features of) one input row."""
    return [m(x[..., :m.in_features]) for m in layers]


def bench_model(name: str, blocks: int, methods: list[str], device: torch.device) -> list[dict]:
    shapes = SHAPES[name]
    rows = []
    x = torch.randn(1, 1, max(k for _, k in shapes), dtype=torch.bfloat16, device=device)
    for method in methods:
        started = time.perf_counter()
        seq = nn.ModuleList(layers(shapes, blocks, device))
        if method.startswith("nf4"):
            quantize_linears(seq, NF4, nf4_kernel=method == "nf4")
        fn = functools.partial(run_all, seq)
        try:
            with torch.inference_mode():
                outs = fn(x)
                error = max(nf4_error(m, x, out) for m, out in zip(seq, outs)) if method.startswith("nf4") else 0.0
                if error > NF4_REL_TOLERANCE:
                    raise AssertionError(f"{method}: relative error {error:.2e} against the dequantized weights")
                seconds = graph_time(fn, x)
        except Exception as e:  # one method failing should not hide the others' figures
            log.exception("%s %s failed", name, method)
            rows.append({"model": name, "method": method, "error": f"{type(e).__name__}: {e}"})
            continue
        weight = weight_bytes(seq)
        row = {"model": name, "method": method, "blocks": blocks, "weight_bytes": weight,
               "ms_per_block": 1e3 * seconds / blocks, "gbps": weight / seconds / 1e9, "rel_error": error,
               "setup_s": time.perf_counter() - started}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del seq, fn, outs
        torch.cuda.empty_cache()
    return rows


def nf4_error(layer, x: torch.Tensor, out: torch.Tensor) -> float:
    """‖out − x Wᵀ‖ / ‖x Wᵀ‖ with W the layer's nf4 weights dequantized, in float32."""
    import bitsandbytes.functional as bnbf
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    ref = x[..., :layer.in_features].float() @ w.t()
    return ((out.float() - ref).norm() / ref.norm()).item()


def sweep(name: str, device: torch.device, copy: float) -> list[dict]:
    """Each kernel configuration on each distinct layer shape of `name`, alone, over 1 GiB of distinct weights."""
    rows = []
    for n, k in dict.fromkeys(SHAPES[name]):
        count = max(1, SWEEP_BYTES // (n * k // 2))
        seq = nn.ModuleList(layers([(n, k)], count, device))
        quantize_linears(seq, NF4)
        x = torch.randn(k, dtype=torch.bfloat16, device=device)
        ops = [nf4_gemv.operands(m.weight) for m in seq]
        weight = weight_bytes(seq)
        for config in SWEEP_CONFIGS:
            kern = nf4_gemv.kernel(config, device)
            out = torch.full((count, n), float("nan"), dtype=torch.bfloat16, device=device)

            def run(x, kern=kern, out=out):
                for i, o in enumerate(ops):
                    kern(x, out[i], o)

            with torch.inference_mode():
                run(x)
                error = nf4_error(seq[0], x, out[0])
                seconds = graph_time(run, x)
            row = {"model": name, "shape": [n, k], "config": repr(config), "rel_error": error,
                   "unwritten": int(out.isnan().sum()), "gbps": weight / seconds / 1e9}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del seq, ops
        torch.cuda.empty_cache()
    print(f"\n{'shape':<14} {'best config':<66} {'GB/s':>7} {'% copy':>7}  (default {nf4_gemv.DEFAULT_CONFIG})")
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        best = max((r for r in rows if tuple(r["shape"]) == shape), key=lambda r: r["gbps"])
        print(f"{str(shape):<14} {best['config']:<66} {best['gbps']:7.0f} {100 * best['gbps'] * 1e9 / copy:6.0f}%")
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--blocks", type=int, default=4, help="blocks of distinct weights (more than L2 holds)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--sweep", action="store_true", help="time every configuration of Corolla's nf4 kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy / 1e9:.0f} GB/s", flush=True)
    rows = []
    for name in args.models:
        if args.sweep:
            rows += sweep(name, device, copy)
    for name in args.models:
        rows += bench_model(name, args.blocks, args.methods, device)
    print(f"\n{'model':<12} {'method':<15} {'ms/block':>9} {'GB/s':>7} {'% copy':>7} {'rel. error':>10}")
    for r in rows:
        if "config" in r:
            continue
        if "error" in r:
            print(f"{r['model']:<12} {r['method']:<15} {r['error'][:60]}")
        else:
            print(f"{r['model']:<12} {r['method']:<15} {r['ms_per_block']:9.3f} {r['gbps']:7.0f} "
                  f"{100 * r['gbps'] * 1e9 / copy:6.0f}% {r['rel_error']:10.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy / 1e9, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
