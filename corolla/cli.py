"""The `corolla` command: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

log = logging.getLogger("corolla")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # these machines reach no model hub; never try
    parser = argparse.ArgumentParser(prog="corolla", description="Run large language models across a swarm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="turn the bundled SmolLM2-135M GGUF into a safetensors folder")
    convert.add_argument("--out", help="target folder (default: ~/.cache/corolla/models/SmolLM2-135M-Instruct)")
    convert.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    convert.set_defaults(run=_convert)

    worker = commands.add_parser("worker", help="serve a span of a model's blocks")
    worker.add_argument("--config", help="YAML file of settings; flags override its keys")
    worker.add_argument("--model", help="Hugging Face model folder")
    worker.add_argument("--blocks", help="span to serve, start:end")
    worker.add_argument("--num-blocks", type=int, help="number of blocks to serve (instead of --blocks)")
    worker.add_argument("--model-id", help="name announced to the swarm (default: the folder's name)")
    worker.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    worker.add_argument("--device", help="cpu or cuda:N")
    worker.add_argument("--host", help="address to bind")
    worker.add_argument("--port", type=int, help="port to bind (0: any free one)")
    worker.add_argument("--cache-tokens", type=int, help="KV-cache budget in tokens")
    worker.add_argument("--max-batch-size", type=int)
    worker.add_argument("--max-length", type=int, help="longest session a client may open")
    worker.add_argument("--idle-timeout", type=float, help="seconds before an idle session expires")
    worker.add_argument("--threads", type=int, help="torch threads")
    worker.add_argument("--initial-peers", nargs="+", metavar="ENDPOINT", help="any live peers, to join the swarm")
    worker.add_argument("--no-mdns", dest="mdns", action="store_const", const=False,
                        help="neither announce nor browse over mDNS")
    worker.add_argument("--interfaces", nargs="+", metavar="IFACE", help="interfaces (names or IPv4) to announce on")
    worker.add_argument("--public-host", help="address announced to peers instead of the bound one")
    worker.add_argument("--gossip-interval", type=float, help="seconds between gossip rounds")
    worker.add_argument("--discovery-wait", type=float, help="seconds to listen for the swarm before choosing blocks")
    worker.add_argument("--rebalance-interval", type=float,
                        help="seconds between checks whether to move to worse-served blocks (0: never)")
    worker.add_argument("--throughput", type=float, help="inference tokens/s per block to announce (default: measured)")
    worker.add_argument("--adapter", action="append", metavar="NAME=FOLDER",
                        help="serve a LoRA adapter (PEFT folder) under NAME; repeat for several")
    worker.add_argument("--swarm-key", help="private swarm: file holding the swarm secret (see `corolla keygen`)")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: off)")
    worker.add_argument("--quantization", help="none, int8 or nf4: block weights, on a CUDA device (bitsandbytes)")
    worker.add_argument("--no-nf4-kernel", dest="nf4_kernel", action="store_const", const=False,
                        help="nf4: keep bitsandbytes' kernel for one-token products (slower; rounds as transformers + "
                             "bitsandbytes do)")
    worker.add_argument("--random-weights", action="store_const", const=True,
                        help="benchmarks only: random blocks shaped by the folder's config.json, no checkpoint read")
    worker.add_argument("--seed", type=int, help="seed of --random-weights")
    worker.add_argument("--max-decode-batch", type=int,
                        help="most sessions whose single-token steps run as one pass (1: no batching)")
    worker.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                        help="CUDA: run single-token steps eagerly instead of replaying CUDA graphs")
    worker.add_argument("--compile-decode", action="store_const", const=True,
                        help="CUDA: compile the decode step before capturing it (fused kernels, faster; its rounding "
                             "can change tokens against transformers')")
    worker.set_defaults(run=_worker)

    keygen = commands.add_parser("keygen", help="create a private swarm's secret key file")
    keygen.add_argument("path", help="file to write (readable by its owner only)")
    keygen.set_defaults(run=_keygen)

    swarm = commands.add_parser("swarm", help="show the swarm: models, block coverage, workers, health")
    swarm.add_argument("--initial-peers", nargs="+", metavar="ENDPOINT", help="peers to pull the gossip table from")
    swarm.add_argument("--no-mdns", dest="mdns", action="store_false", help="do not browse mDNS")
    swarm.add_argument("--interfaces", nargs="+", metavar="IFACE", help="mDNS interfaces (default: non-loopback)")
    swarm.add_argument("--model", help="show only this model id")
    swarm.add_argument("--once", action="store_true", help="print the table once and exit")
    swarm.add_argument("--refresh", type=float, default=3.0, help="seconds between refreshes")
    swarm.add_argument("--wait", type=float, default=3.0, help="seconds to listen before the first table")
    swarm.add_argument("--swarm-key", help="private swarm: file holding the swarm secret (see `corolla keygen`)")
    swarm.set_defaults(run=_swarm)

    demo = commands.add_parser("demo", help="a local two-worker swarm of SmolLM2-135M generating text")
    demo.add_argument("--prompt", default="A cat sat", help="text to continue")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--chat", action="store_true", help="treat the prompt as a chat message (chat template)")
    demo.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    demo.set_defaults(run=_demo)

    api = commands.add_parser("api", help="an OpenAI-compatible HTTP API, a chat page and a swarm monitor")
    api.add_argument("--model", action="append", default=[], metavar="FOLDER",
                     help="model folder to offer (repeat for several); its name is the model id")
    api.add_argument("--initial-peers", nargs="+", default=[], metavar="ENDPOINT", help="any live peers of the swarm")
    api.add_argument("--no-mdns", dest="mdns", action="store_false", help="do not browse mDNS")
    api.add_argument("--interfaces", nargs="+", metavar="IFACE", help="mDNS interfaces (default: non-loopback)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--swarm-key", help="private swarm: file holding the swarm secret (see `corolla keygen`)")
    api.add_argument("--demo", action="store_true", help="first start the demo's local 2-worker swarm and offer it")
    api.set_defaults(run=_api)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        from corolla.bus.errors import CorollaError
        from corolla.worker.config import ConfigError
        from corolla.worker.loader import CheckpointError
        if isinstance(e, (CorollaError, ConfigError, CheckpointError, OSError, ValueError)):
            print(f"corolla {args.command}: {e}", file=sys.stderr)
            sys.exit(2)
        raise


def _convert(args) -> None:
    from pathlib import Path

    from corolla.models.convert import convert
    out = Path(args.out) if args.out else None
    folder = convert(out, force=args.force)
    print(f"model folder: {folder}")


def _worker(args) -> None:
    from corolla.worker.config import ConfigError, WorkerConfig
    from corolla.worker.main import serve

    overrides = {k: getattr(args, k) for k in ("model", "blocks", "num_blocks", "model_id", "dtype", "device", "host",
                                                "port", "cache_tokens", "max_batch_size", "max_length",
                                                "idle_timeout", "threads", "initial_peers", "mdns",
                                                "interfaces", "public_host", "gossip_interval", "discovery_wait",
                                                "rebalance_interval", "throughput", "metrics_port", "quantization",
                                                "random_weights", "seed", "cuda_graphs", "compile_decode",
                                                "nf4_kernel", "swarm_key", "max_decode_batch")}
    if args.adapter:
        pairs = [a.split("=", 1) for a in args.adapter]
        if any(len(p) != 2 or not all(p) for p in pairs):
            raise ConfigError("--adapter takes NAME=FOLDER")
        overrides["adapters"] = dict(pairs)
    config = WorkerConfig.load(args.config, **overrides)

    def ready(service, endpoint):
        print(f"corolla worker ready: {endpoint} blocks {service.start}:{service.end} of {service.model_id} "
              f"({config.dtype} on {config.device}, peer {service.peer_id})", flush=True)

    asyncio.run(serve(config, ready))


def _swarm(args) -> None:
    from corolla.monitor import run_monitor
    run_monitor(args.initial_peers or [], mdns=args.mdns, interfaces=args.interfaces, model=args.model,
                once=args.once, refresh=args.refresh, wait=args.wait, swarm_key=args.swarm_key)


def _keygen(args) -> None:
    from pathlib import Path

    from corolla.bus.security import generate_secret
    path = Path(args.path)
    if path.exists():
        raise FileExistsError(f"{path} exists; a swarm key is never overwritten")
    path.touch(mode=0o600)
    path.write_text(generate_secret() + "\n")
    print(f"swarm key written to {path}; give it to every worker (--swarm-key) and client (swarm_key=...) of the swarm")


def _api(args) -> None:
    from corolla.api.server import run_api
    run_api(args.model, args.initial_peers, args.host, args.port, mdns=args.mdns, interfaces=args.interfaces,
            swarm_key=args.swarm_key, demo=args.demo)


def _demo(args) -> None:
    from corolla.demo import run_demo
    run_demo(args.prompt, args.max_new_tokens, chat=args.chat, sample=args.sample)
