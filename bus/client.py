"""DEALER connections to workers, driven by one background asyncio loop.

User code (transformers' generate, a training loop) is synchronous, while the
bus wants many requests in flight and background pings. So the client runs a
single event loop in a daemon thread (`BusLoop`); synchronous callers hand it
coroutines and block on the result.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import threading
from typing import Any, Collection, Coroutine

import zmq
import zmq.asyncio
import zmq.utils.monitor

from corolla.bus import wire
from corolla.bus.errors import ErrorCode, RemoteError, RequestTimeout
from corolla.bus.messages import ErrorReply
from corolla.bus.security import Security

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
STOP_TIMEOUT_S = 2.0  # at exit, how long the bus loop may take to stop


class BusLoop:
    """An asyncio loop in a daemon thread, shared by every connection of a process."""

    _instance: "BusLoop | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="corolla-bus", daemon=True)
        self.thread.start()
        self.context = zmq.asyncio.Context()
        self._background: set[concurrent.futures.Future] = set()
        atexit.register(self._stop)

    @classmethod
    def get(cls) -> "BusLoop":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _stop(self) -> None:
        """At interpreter exit: cancel the loop's tasks (none is left pending to be destroyed), stop the loop, then
        close every socket and end libzmq's threads, so that nothing is still running in them while the
        interpreter tears down (which can abort the process). The loop is left open: finalizers that run later
        may still schedule on it, harmlessly. Work handed over with `submit` (sessions closing) finishes first."""
        concurrent.futures.wait(list(self._background), timeout=STOP_TIMEOUT_S)
        try:
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), self.loop).result(STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the bus loop's tasks did not finish within %.0f s of exit", STOP_TIMEOUT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=STOP_TIMEOUT_S)
        if not self.thread.is_alive():  # else the loop may still be using its sockets: leave them be
            self.context.destroy(linger=0)

    def submit(self, coro: Coroutine) -> None:
        """Run a coroutine on the loop without waiting for it (it must handle its own errors); exit waits for it.
        After the loop has stopped (a finalizer at exit) it is dropped."""
        if not self.loop.is_running():
            coro.close()
            return
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run a coroutine on the loop and wait for it from a foreign thread."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("BusLoop.run called from the bus thread itself; await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def _cancel_tasks() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Connection:
    """One DEALER socket to one worker; replies are matched to requests by id."""

    def __init__(self, endpoint: str, context: zmq.asyncio.Context, security: Security | None = None,
                 max_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, lost: bool = False):
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        (security or Security.public()).apply_client(self.socket)
        # Lost connections (a killed worker) fail the requests in flight at once instead of at their timeout.
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        # None until the first connection; False while it is lost (from the start where the pool knows it was)
        self.connected: bool | None = False if lost else None
        self.socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []

    async def request(self, msg: Any, timeout: float = DEFAULT_TIMEOUT, codec: wire.Codec = wire.RAW,
                      reply_codec: wire.Codec | None = None) -> Any:
        """Send `msg` and wait for its reply; an error reply raises RemoteError naming this worker."""
        self.start()
        if self.connected is False:  # ZeroMQ keeps reconnecting; meanwhile callers route elsewhere at once
            raise RemoteError(self.endpoint, ErrorCode.UNREACHABLE, "connection lost")
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[request_id] = future
        # The send is done at once unless the socket has no pipe to the worker (a handshake failed: a wrong swarm
        # key), when it would wait for one without end; the timeout bounds both. A timer is cheaper than wait_for's
        # extra task per request.
        sending = self.socket.send_multipart(wire.encode(msg, request_id, codec, reply_codec or codec), copy=False)
        timer = loop.call_later(timeout, _expire, future, sending)
        try:
            await sending
            reply = await future
        except asyncio.TimeoutError:
            raise RequestTimeout(self.endpoint, timeout) from None
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        if isinstance(reply, ErrorReply):
            raise RemoteError(self.endpoint, _code(reply.code), reply.message)
        return reply

    @property
    def idle(self) -> bool:
        """No request awaits a reply."""
        return not self._pending

    def start(self) -> None:
        """Read replies and watch the connection from now on (the first request starts it otherwise); on the loop.
        ZeroMQ connects, handshakes included, from construction on, so `connected` turns True without a request."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]

    async def _read(self) -> None:
        while True:
            frames = await self.socket.recv_multipart(copy=False)
            try:
                envelope = wire.decode(frames, self.max_bytes)
            except Exception as e:
                log.warning("undecodable reply from %s: %s", self.endpoint, e)
                continue
            future = self._pending.get(envelope.request_id)
            if future is not None and not future.done():
                future.set_result(envelope.message)

    async def _watch(self) -> None:
        while True:
            event = zmq.utils.monitor.parse_monitor_message(await self._monitor.recv_multipart())
            self.connected = event["event"] == zmq.EVENT_CONNECTED
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = RemoteError(self.endpoint, ErrorCode.UNREACHABLE, "connection lost")
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(lost)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for future in self._pending.values():
            future.cancel()
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)


def _expire(reply: asyncio.Future, sending: asyncio.Future) -> None:
    """Fail whichever of the request's two waits is still on (a send given up is dropped from pyzmq's queue)."""
    waiting = reply if sending.done() else sending
    if not waiting.done():
        waiting.set_exception(asyncio.TimeoutError())


def _code(code: str) -> ErrorCode | str:
    try:
        return ErrorCode(code)
    except ValueError:
        return code


class ConnectionPool:
    """One connection per endpoint, created on first use from the bus loop."""

    def __init__(self, context: zmq.asyncio.Context, security: Security | None = None):
        self.context = context
        self.security = security
        self._connections: dict[str, Connection] = {}
        self._lost: set[str] = set()  # endpoints whose lost connection prune() closed

    def get(self, endpoint: str) -> Connection:
        connection = self._connections.get(endpoint)
        if connection is None:
            lost = endpoint in self._lost
            self._lost.discard(endpoint)
            connection = self._connections[endpoint] = Connection(endpoint, self.context, self.security, lost=lost)
        return connection

    def __len__(self) -> int:
        return len(self._connections)

    def __contains__(self, endpoint: str) -> bool:
        return endpoint in self._connections

    async def prune(self, keep: Collection[str]) -> None:
        """Close the connections outside `keep` that are not up and carry no request: workers that left the swarm.
        ZeroMQ would retry each every 100 ms for as long as this process lives, each holding its sockets. Asked
        for again, such an endpoint's connection reports itself lost until ZeroMQ reaches the worker, so a caller
        still naming it routes elsewhere at once rather than waiting out a timeout."""
        for endpoint, connection in list(self._connections.items()):
            if endpoint not in keep and connection.connected is not True and connection.idle:
                self._lost.add(endpoint)
                await self.drop(endpoint)

    @property
    def connected(self) -> int:
        """How many of the pool's connections are up (those started or used: the others are not watched)."""
        return sum(1 for c in self._connections.values() if c.connected)

    async def drop(self, endpoint: str) -> None:
        connection = self._connections.pop(endpoint, None)
        if connection is not None:
            await connection.close()

    async def close(self) -> None:
        for endpoint in list(self._connections):
            await self.drop(endpoint)
