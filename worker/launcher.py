"""Start worker processes on this machine and wait until each answers: the demo's, tests' and benchmarks' swarm."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

READY = re.compile(r"corolla worker ready: (?P<endpoint>\S+) blocks (?P<start>\d+):(?P<end>\d+)")


class LaunchError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    endpoint: str = ""
    start: int = 0
    end: int = 0
    output: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            match = READY.search(line)
            if match and not self.ready.is_set():
                self.endpoint, self.start, self.end = match["endpoint"], int(match["start"]), int(match["end"])
                self.ready.set()
        self.process.stdout.close()
        self.ready.set()

    def wait_ready(self, timeout: float = 120.0) -> "WorkerProcess":
        if not self.ready.wait(timeout):
            self.stop()
            raise LaunchError(f"worker did not become ready in {timeout:.0f} s:\n{''.join(self.output[-20:])}")
        if not self.endpoint:
            raise LaunchError(f"worker exited with {self.process.wait()}:\n{''.join(self.output[-20:])}")
        return self

    def terminate(self) -> None:
        """Ask the worker to stop (SIGTERM: it leaves the swarm, then exits); `stop` waits for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def spawn_worker(*args: str, env: dict | None = None, prefix: list[str] | None = None) -> WorkerProcess:
    """Run `corolla worker ARGS...` in a child process; its output is drained in the background."""
    argv = [*(prefix or []), sys.executable, "-m", "corolla", "worker", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    worker = WorkerProcess(process)
    threading.Thread(target=worker._drain, daemon=True).start()
    return worker


def start_worker(*args: str, timeout: float = 120.0, **kwargs) -> WorkerProcess:
    """Spawn a worker and return once it prints its ready line."""
    return spawn_worker(*args, **kwargs).wait_ready(timeout)


def openmp_env(worker_args: list[list[str]]) -> dict[str, str]:
    """Passive OpenMP waits for workers whose threads together outnumber this machine's cores.

    An idle OpenMP thread spins about 3 ms (libgomp's default) before it sleeps, which keeps a decode step's many
    short parallel regions fast: sleeping at once costs a wake-up per region, 18-40% of a CPU worker's step on a
    16-core VM (perf/RESULTS.md). But a chain's workers compute in turn, so where they share cores the spinning of
    the one that just finished takes the cores of the one computing now. A worker whose threads neither --threads nor
    its --config file sets counts as using every core."""
    if "OMP_WAIT_POLICY" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0))
    threads = sum(_threads(args) or cores for args in worker_args)
    return {"OMP_WAIT_POLICY": "PASSIVE"} if len(worker_args) > 1 and threads > cores else {}


def _threads(args: list[str]) -> int | None:
    """A worker's --threads, else its config file's threads; None where neither sets them (or the file is bad: the
    worker itself will say so)."""
    flags = dict(zip(args, args[1:]))
    if "--threads" in flags:
        return int(flags["--threads"])
    if "--config" in flags:
        from corolla.worker.config import ConfigError, WorkerConfig
        try:
            return WorkerConfig.load(flags["--config"]).threads
        except ConfigError:
            return None
    return None


def stop_all(workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker at once, then wait for each: the swarm stops in its slowest worker's time, and no worker
    outlives the others by long enough for their peers (or a client still connected) to report it gone."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()


class LocalSwarm:
    """Several workers on loopback, stopped together."""

    def __init__(self, worker_args: list[list[str]], timeout: float = 120.0, env: dict | None = None, **kwargs):
        env = {**openmp_env(worker_args), **(env or {})}
        self.workers = [spawn_worker(*args, env=env, **kwargs) for args in worker_args]  # start together, in parallel
        try:
            for worker in self.workers:
                worker.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [w.endpoint for w in self.workers]

    def stop(self) -> None:
        stop_all(self.workers)

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
