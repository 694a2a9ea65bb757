"""A ROUTER socket that answers each request in its own asyncio task.

Many requests from one client may be in flight at once; each reply carries the
request's id so the client matches them. Whatever a handler raises becomes an
error reply: a bad request never stops the server or disturbs other clients.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from corolla.bus import wire
from corolla.bus.errors import ErrorCode, ProtocolError
from corolla.bus.messages import ErrorReply
from corolla.bus.security import Security

log = logging.getLogger(__name__)

Handler = Callable[[wire.Envelope], Awaitable[Any]]


class RequestError(Exception):
    """Raised by handlers to answer with an error code instead of a result."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Server:
    def __init__(self, handler: Handler, endpoint: str = "tcp://127.0.0.1:0",
                 max_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, security: Security | None = None,
                 context: zmq.asyncio.Context | None = None):
        self.handler = handler
        self.max_bytes = max_bytes
        self.context = context or zmq.asyncio.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A hard cap below which wire.decode gives a clear TOO_LARGE; beyond it ZeroMQ drops the peer.
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_bytes * 2)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        (security or Security.public()).apply_server(self.socket)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def serve(self) -> None:
        """Receive until close(); each request is handled concurrently."""
        while not self._closed:
            try:
                frames = await self.socket.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                if self._closed:
                    return
                raise
            task = asyncio.create_task(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frames: list) -> None:
        identity, payload = frames[0], frames[1:]
        request_id = -1
        try:
            if not payload:
                raise ProtocolError(ErrorCode.BAD_FRAMES, "no header frame")
            request_id = wire.peek_request_id(payload[0].buffer)
            request_id = -1 if request_id is None else request_id
            envelope = wire.decode(payload, self.max_bytes)
            reply = await self.handler(envelope)
            out = wire.encode(reply, request_id, envelope.reply_codec)
        except (ProtocolError, RequestError) as e:
            out = wire.encode(ErrorReply(str(e.code), e.message), request_id)
        except Exception as e:
            log.exception("request %s failed", request_id)
            out = wire.encode(ErrorReply(str(ErrorCode.INTERNAL), f"{type(e).__name__}: {e}"), request_id)
        if not self._closed:
            await self.socket.send_multipart([identity, *out], copy=False)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait for the requests being answered now."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        self.socket.close(linger=0)
