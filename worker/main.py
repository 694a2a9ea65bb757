"""A worker process: load the span, bind the ROUTER socket, serve until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from corolla.bus.security import Security
from corolla.bus.server import Server
from corolla.models.registry import family_for
from corolla.worker.adapters import AdapterSet
from corolla.worker.config import ConfigError, WorkerConfig
from corolla.worker.cuda_graph import make_current
from corolla.worker.loader import load_config, load_span
from corolla.worker.memory import check_fits
from corolla.worker.metrics import WorkerMetrics
from corolla.worker.random_weights import random_span
from corolla.worker.service import WorkerService
from corolla.worker.swarm import SwarmMembership

log = logging.getLogger(__name__)

EXPIRY_INTERVAL = 5.0


def choose_span(config: WorkerConfig, num_blocks: int) -> tuple[int, int]:
    span = config.span()
    if span is None:
        if config.num_blocks is None:
            raise ConfigError("give either blocks (start:end) or num_blocks")
        if not 0 < config.num_blocks <= num_blocks:
            raise ConfigError(f"num_blocks must be in 1..{num_blocks}")
        span = (0, config.num_blocks)
    if span[1] > num_blocks:
        raise ConfigError(f"blocks {span[0]}:{span[1]} exceed the model's {num_blocks} blocks")
    return span


async def serve(config: WorkerConfig, ready=None) -> None:
    """Run one worker until SIGTERM/SIGINT; `ready(service, endpoint)` is called once it answers requests."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {config.device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    make_current(device)  # CUDA's current device is per thread: this one's and the loader threads'
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(initializer=make_current, initargs=(device,)))
    model_config = load_config(config.model)
    model_id = config.model_id or Path(config.model).resolve().name
    membership = SwarmMembership(config, model_id, model_config.num_hidden_layers)
    start, end = choose_span(config, model_config.num_hidden_layers)
    if config.span() is None:  # only a number of blocks: take those the swarm serves worst
        start, end = await membership.choose_span(end - start)
    if device.type == "cuda":
        check_fits(model_config, start, end, config.torch_dtype, config.quantization, config.cache_tokens,
                   torch.cuda.mem_get_info(device)[0], config.device)
    try:
        if config.random_weights:  # benchmarks only: shapes from config.json, no checkpoint
            span = await asyncio.to_thread(random_span, model_config, start, end, config.torch_dtype, config.device,
                                           config.quantization, config.seed, config.nf4_kernel)
        else:
            span = await asyncio.to_thread(load_span, config.model, start, end, config.torch_dtype, config.device,
                                           quantization=config.quantization, nf4_kernel=config.nf4_kernel)
    except torch.OutOfMemoryError:  # the estimate fell short, or another process took the memory meanwhile
        raise ConfigError(f"{config.device} ran out of memory loading blocks {start}:{end}: serve fewer blocks, "
                          f"lower cache_tokens or quantize") from None
    adapters = AdapterSet(span, family_for(model_config).block_prefix, config.adapters) if config.adapters else None
    security = Security.from_file(config.swarm_key)
    service = WorkerService(span, config, model_id, model_config.num_hidden_layers, start, end,
                            model_config.hidden_size, adapters, security)
    metrics = WorkerMetrics(service) if config.metrics_port else None
    server = Server(service.handle, f"tcp://{config.host}:{config.port}", max_bytes=config.max_message_bytes,
                    security=security, observer=metrics.observe if metrics else None)
    metrics_http = metrics.serve(config.host, config.metrics_port) if metrics else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await membership.join(service, server)  # before serving: gossip never meets a worker that cannot answer it
    serving = asyncio.create_task(server.serve())
    expiry = asyncio.create_task(_expire_sessions(service))
    if ready is not None:
        ready(service, server.endpoint)
    await stop.wait()
    await membership.leave()  # goodbye first, so no client picks this worker while it drains
    log.info("stopping: finishing %d requests in flight", server.in_flight)
    serving.cancel()
    expiry.cancel()
    await server.drain()
    server.close()
    service.close()
    if metrics_http is not None:
        metrics_http.shutdown()


async def _expire_sessions(service: WorkerService) -> None:
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL)
        for sid in service.sessions.expire():
            log.info("session %s expired after %.0f s idle", sid, service.sessions.idle_timeout)
