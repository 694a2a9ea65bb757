"""Wire codecs on one activation tensor: CPU cost, bytes on the wire, error.

``bench_codecs`` is the reusable part (perf/bench_bus.py feeds it real hidden
states); ``main`` runs it on random normal data, which has none of the outlier
channels real hidden states have, so its error and lz4 numbers are only a
baseline. Timings are codec CPU time only, no sockets: encode from the tensor,
decode from a read-only ``bytes`` copy of the frame (what a receiver holds),
each the best of several repeats so scheduler noise does not count.

    python perf/bench_codecs.py [--json PATH] [--threads N]

With torch's default thread count, a CPU shared with other busy processes
stalls each parallel op on a descheduled worker thread (measured: a 6 us cast
took 8 ms with 2 threads on a loaded 2-core box), so compare runs at the same
--threads and look at the logged machine line.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from corolla.compression import decode, encode

log = logging.getLogger("bench_codecs")

CONFIGS = (
    ("raw", torch.float32),
    ("raw", torch.float16),
    ("raw", torch.bfloat16),
    ("lz4", torch.float16),
    ("int8", torch.float16),
)
REPEATS = 7
MIN_REPEAT_SECONDS = 0.02  # each repeat loops until it lasts this long, far above timer resolution

RANDOM_SHAPE = (1, 128, 576)  # one 128-token chunk of SmolLM2-135M's residual stream
RANDOM_STD = 2.0  # an arbitrary O(1) scale; errors are relative, so it only matters for the fp16 guard
RANDOM_LABEL = "random normal (not real hidden states)"

FP16_BYTES = torch.finfo(torch.float16).bits // 8


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best per-call time over ``repeats`` timed loops."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_REPEAT_SECONDS:
            break
        loops *= 2
    best = elapsed / loops
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def _relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().cpu(), y.double()
    diff, norm = (x - y).norm().item(), x.norm().item()
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def bench_codecs(hidden: torch.Tensor, label: str, repeats: int = REPEATS) -> list[dict]:
    """One row per (codec, wire dtype) in CONFIGS for the float tensor ``hidden``.

    Row keys: label, shape, dtype, codec/wire (asked), sent_codec/sent_wire
    (what the spec says was used), wire_bytes, x_vs_fp16 (raw float16 bytes /
    wire_bytes: above 1 means smaller than plain fp16), encode_us, decode_us,
    gbps (tensor bytes / (encode + decode) time) and rel_error
    (||x - decode(encode(x))|| / ||x||).
    """
    if not hidden.is_floating_point():
        raise ValueError(f"bench_codecs needs a float tensor, got {hidden.dtype}")
    fp16_bytes = hidden.numel() * FP16_BYTES
    rows = []
    for codec, wire in CONFIGS:
        spec, frame = encode(hidden, codec, wire)
        received = bytes(frame)
        encode_s = _best_seconds(lambda: encode(hidden, codec, wire), repeats)
        decode_s = _best_seconds(lambda: decode(spec, received), repeats)
        rows.append(
            {
                "label": label,
                "shape": list(hidden.shape),
                "dtype": str(hidden.dtype).removeprefix("torch."),
                "codec": codec,
                "wire": str(wire).removeprefix("torch."),
                "sent_codec": spec.codec,
                "sent_wire": spec.wire,
                "wire_bytes": len(received),
                "x_vs_fp16": fp16_bytes / len(received) if received else float("nan"),
                "encode_us": encode_s * 1e6,
                "decode_us": decode_s * 1e6,
                "gbps": hidden.nbytes / (encode_s + decode_s) / 1e9,
                "rel_error": _relative_error(hidden, decode(spec, received)),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Human-readable table of bench_codecs rows (grouped by label)."""
    header = (
        f"{'codec/wire asked':<18} {'sent as':<15} {'wire bytes':>11} {'x vs fp16':>9} "
        f"{'enc us':>8} {'dec us':>8} {'GB/s':>7} {'rel err':>9}"
    )
    lines, label = [], None
    for row in rows:
        if row["label"] != label:
            label = row["label"]
            lines += ["", f"{label}: {row['dtype']} {tuple(row['shape'])}", header, "-" * len(header)]
        lines.append(
            f"{row['codec'] + '/' + row['wire']:<18} {row['sent_codec'] + '/' + row['sent_wire']:<15} "
            f"{row['wire_bytes']:>11,} {row['x_vs_fp16']:>9.2f} {row['encode_us']:>8.1f} "
            f"{row['decode_us']:>8.1f} {row['gbps']:>7.2f} {row['rel_error']:>9.2e}"
        )
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows (and the machine) as JSON here")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads; 1 avoids multi-ms stalls on a busy small box"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    log.info("machine: %s", machine)
    generator = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(RANDOM_SHAPE, generator=generator) * RANDOM_STD
    rows = bench_codecs(hidden, RANDOM_LABEL, args.repeats)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
