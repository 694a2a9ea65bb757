"""A ROUTER socket that answers each request in its own asyncio task.

Many requests from one client may be in flight at once; each reply carries the
request's id so the client matches them. Whatever a handler raises becomes an
error reply: a bad request never stops the server or disturbs other clients.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from corolla.bus import wire
from corolla.bus.errors import ErrorCode, ProtocolError
from corolla.bus.messages import ErrorReply
from corolla.bus.security import Security

log = logging.getLogger(__name__)

Handler = Callable[[wire.Envelope], Awaitable[Any]]


@dataclass(frozen=True)
class Answered:
    """One answered request, as a server's observer (a worker's metrics) sees it."""

    kind: str  # the request's message kind; "?" where it did not decode
    status: str  # "ok" or the error code sent back
    seconds: float  # from receipt to the reply being handed to the socket
    bytes_in: int
    bytes_out: int
    codec: str  # the codec the sender asked activations to travel in
    message: Any  # the decoded request; None where it did not decode


Observer = Callable[[Answered], None]


class RequestError(Exception):
    """Raised by handlers to answer with an error code instead of a result."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Server:
    def __init__(self, handler: Handler, endpoint: str = "tcp://127.0.0.1:0",
                 max_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, security: Security | None = None,
                 context: zmq.asyncio.Context | None = None, observer: Observer | None = None):
        self.handler = handler
        self.observer = observer
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
        started, envelope, status = time.perf_counter(), None, "ok"
        try:
            if not payload:
                raise ProtocolError(ErrorCode.BAD_FRAMES, "no header frame")
            request_id = wire.peek_request_id(payload[0].buffer)
            request_id = -1 if request_id is None else request_id
            envelope = wire.decode(payload, self.max_bytes)
            reply = await self.handler(envelope)
            out = wire.encode(reply, request_id, envelope.reply_codec)
        except (ProtocolError, RequestError) as e:
            status = str(e.code)
            out = wire.encode(ErrorReply(status, e.message), request_id)
        except Exception as e:
            log.exception("request %s failed", request_id)
            status = str(ErrorCode.INTERNAL)
            out = wire.encode(ErrorReply(status, f"{type(e).__name__}: {e}"), request_id)
        if not self._closed:
            await self.socket.send_multipart([identity, *out], copy=False)
        if self.observer is not None:
            self.observer(Answered(
                kind=type(envelope.message).KIND if envelope else "?", status=status,
                seconds=time.perf_counter() - started, bytes_in=sum(len(f) for f in payload),
                bytes_out=sum(memoryview(f).nbytes for f in out),
                codec=envelope.reply_codec.name if envelope else "?", message=envelope.message if envelope else None))

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
