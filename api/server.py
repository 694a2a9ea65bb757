"""`corolla api`: load the client half of each model, find the swarm, and serve the app with uvicorn.

`--demo` first starts the demo's two local workers (SmolLM2-135M, blocks 0:15
and 15:30) and serves them, so one command gives a chat page over a swarm.
"""
from __future__ import annotations

import contextlib
import logging
import socket

import uvicorn

from corolla.api.app import ServedModel, create_app
from corolla.api.swarm import SwarmState
from corolla.bus.security import Security

log = logging.getLogger(__name__)

DISCOVERY_WAIT_S = 3.0  # how long to listen for the swarm before serving: /v1/models is empty until it is found
DEMO_CONFIGS = ("demo-worker-a.yaml", "demo-worker-b.yaml")


class ApiServer(uvicorn.Server):
    """uvicorn's server that says where it listens once it does (the CLI's ready line)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            for s in self.servers:
                for sock in s.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"corolla api ready: http://{host}:{port} (chat /chat, monitor /monitor, "
                          f"OpenAI base URL http://{host}:{port}/v1)", flush=True)


def build(model_folders: list[str], initial_peers: list[str], mdns: bool = True,
          interfaces: list[str] | None = None, swarm_key: str | None = None, wait: float = DISCOVERY_WAIT_S):
    """The app and the swarm state it reads (stop the state when done); `swarm_key`: a private swarm's key file."""
    swarm = SwarmState(initial_peers, mdns=mdns and not initial_peers, interfaces=interfaces,
                       security=Security.from_file(swarm_key))
    swarm.start(wait)
    try:
        models = [ServedModel.load(folder, initial_peers=initial_peers, mdns=mdns, interfaces=interfaces or [],
                                   swarm_key=swarm_key)
                  for folder in model_folders]
    except BaseException:
        swarm.stop()
        raise
    return create_app(models, swarm), swarm


def run_api(model_folders: list[str], initial_peers: list[str], host: str, port: int, mdns: bool = True,
            interfaces: list[str] | None = None, swarm_key: str | None = None, demo: bool = False) -> None:
    with contextlib.ExitStack() as stack:
        if demo:
            folder, endpoints = _start_demo_swarm(stack)
            model_folders, initial_peers = model_folders or [folder], [*initial_peers, *endpoints]
        if not model_folders:
            raise ValueError("give --model FOLDER (or --demo)")
        app, swarm = build(model_folders, initial_peers, mdns, interfaces, swarm_key)
        stack.callback(swarm.stop)
        ApiServer(uvicorn.Config(app, host=host, port=port, log_level="info")).run()


def _start_demo_swarm(stack: contextlib.ExitStack) -> tuple[str, list[str]]:
    from corolla.demo import CONFIGS
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm, openmp_env

    folder = str(convert())
    log.info("starting the demo's 2 workers of %s ...", folder)
    # The second joins the first's swarm (one gossip table for both), once the first answers gossip.
    args = [["--config", str(CONFIGS / name), "--model", folder] for name in DEMO_CONFIGS[:2]]
    env = openmp_env(args)  # started apart, the two still share this machine's cores
    first = stack.enter_context(LocalSwarm([args[0]], env=env))
    second = stack.enter_context(LocalSwarm([[*args[1], "--initial-peers", *first.endpoints]], env=env))
    workers = first.workers + second.workers
    for worker in workers:
        log.info("worker %s serves blocks %d:%d", worker.endpoint, worker.start, worker.end)
    return folder, [w.endpoint for w in workers]
