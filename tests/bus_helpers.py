"""An echo server on a real ROUTER socket in a background thread, for testing the bus alone."""
from __future__ import annotations

import asyncio
import threading

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.messages import Forward, HiddenReply, Ping, Pong
from corolla.bus.server import Server


async def echo(envelope):
    msg = envelope.message
    if isinstance(msg, Ping):
        return Pong()
    if isinstance(msg, Forward):
        return HiddenReply(msg.hidden)
    raise ValueError("echo serves ping and forward only")


class EchoServer:
    """A real ROUTER socket answering with `handler` (echo by default), bound to `endpoint`."""

    def __init__(self, max_bytes: int = 64 << 20, handler=echo, endpoint: str = "tcp://127.0.0.1:0"):
        self.handler, self.bind_to = handler, endpoint
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.max_bytes = max_bytes
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        import zmq.asyncio
        self.context = zmq.asyncio.Context()
        self.server = Server(self.handler, self.bind_to, max_bytes=self.max_bytes, context=self.context)
        self.endpoint = self.server.endpoint
        self.task = self.loop.create_task(self.server.serve())
        self.ready.set()
        self.loop.run_forever()

    def close(self):
        async def shutdown():
            self.server.close()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def on_bus(coro_fn, timeout: float = 60):
    """Run `coro_fn(pool)` on the client's bus loop with a connection pool of its own, closed afterwards."""
    bus = BusLoop.get()

    async def run():
        pool = ConnectionPool(bus.context)
        try:
            return await coro_fn(pool)
        finally:
            await pool.close()

    return bus.run(run(), timeout=timeout)
