"""Delaying TCP relay: models a link's one-way latency (and optionally its rate).

The kernel here has no ``netem`` qdisc, so latency is added in user space: the
relay accepts a connection, opens one to the target and forwards bytes both
ways, releasing each chunk ``delay`` seconds after it was read.  Reading goes
on while earlier chunks wait, so the relay is a pipe holding up to a
bandwidth-delay product in flight, not a stop-and-wait link.  With a rate the
relay also serialises chunks at that rate before the delay (chunk leaves at
``max(read time, link free) + size/rate + delay``).

A bounded per-direction buffer stops reading from the sender when too much
is queued, so a bulk sender sees backpressure as on a real link instead of
the relay swallowing everything.

CLI::

    python perf/relay.py --listen 127.0.0.1:0 --target 10.77.0.2:5000 --delay-ms 50

prints ``LISTENING host:port`` on stdout once bound (port 0 picks a free one)
and exits cleanly on SIGTERM/SIGINT.  In-process: :class:`Relay` (asyncio) or
:class:`RelayThread` (runs a relay on its own loop in a background thread).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import signal
import sys
import threading

log = logging.getLogger("corolla.perf.relay")

CHUNK = 256 * 1024
CONNECT_TIMEOUT_S = 10.0


def default_buffer_bytes(delay_s: float, rate_bps: float | None) -> int:
    """In-flight cap per direction: twice the bandwidth-delay product, >= 1 MiB.

    Without a rate the product is unknown, so a size that carries ~1 Gbit/s
    at 50 ms is used.
    """
    if rate_bps is None:
        return 16 * 1024 * 1024
    return max(1024 * 1024, int(2 * rate_bps / 8 * delay_s))


class _Pipe:
    """One direction: a FIFO of (due time, bytes); b"" marks EOF."""

    def __init__(self, delay_s: float, rate_bps: float | None, limit: int) -> None:
        self.delay_s = delay_s
        self.rate_Bps = rate_bps / 8 if rate_bps else None
        self.limit = limit
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.link_free_at = 0.0
        self.nonempty = asyncio.Event()
        self.has_space = asyncio.Event()
        self.has_space.set()

    def due_time(self, now: float, size: int) -> float:
        if self.rate_Bps is None:
            return now + self.delay_s
        self.link_free_at = max(now, self.link_free_at) + size / self.rate_Bps
        return self.link_free_at + self.delay_s

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.has_space.wait()
            data = await reader.read(CHUNK)
            self.queue.append((self.due_time(loop.time(), len(data)), data))
            self.nonempty.set()
            if not data:
                return
            self.queued += len(data)
            if self.queued >= self.limit:
                self.has_space.clear()

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.nonempty.clear()
                await self.nonempty.wait()
            wait = self.queue[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            batch: list[bytes] = []
            eof = False
            while self.queue and self.queue[0][0] <= now:
                data = self.queue.popleft()[1]
                if not data:
                    eof = True
                    break
                batch.append(data)
            if batch:
                writer.writelines(batch)
                await writer.drain()
                self.queued -= sum(map(len, batch))
                if self.queued < self.limit:
                    self.has_space.set()
            if eof:
                if writer.can_write_eof():
                    writer.write_eof()
                return


class Relay:
    """Asyncio relay from ``listen`` to ``target`` with a one-way delay per direction."""

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        delay_ms: float = 0.0,
        rate_mbit: float | None = None,
        buffer_bytes: int | None = None,
    ) -> None:
        self.listen = listen
        self.target = target
        self.delay_s = delay_ms / 1000.0
        self.rate_bps = rate_mbit * 1e6 if rate_mbit else None
        self.buffer_bytes = buffer_bytes or default_buffer_bytes(self.delay_s, self.rate_bps)
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> tuple[str, int]:
        """Bind and start accepting; returns the bound (host, port)."""
        self._server = await asyncio.start_server(
            self._on_accept, self.listen[0], self.listen[1], limit=2 * CHUNK
        )
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info(
            "relay %s:%d -> %s:%d delay %.1f ms rate %s buffer %d B",
            *self.address, *self.target, self.delay_s * 1000,
            f"{self.rate_bps / 1e6:g} Mbit/s" if self.rate_bps else "unlimited",
            self.buffer_bytes,
        )
        return self.address

    async def close(self) -> None:
        """Stop accepting and drop open connections."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # A task of our own, so close() can cancel it without asyncio's stream
        # callback logging the cancellation as an error.
        task = asyncio.create_task(self._relay(c_reader, c_writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        peer = c_writer.get_extra_info("peername")
        t_writer = None
        try:
            t_reader, t_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target, limit=2 * CHUNK), CONNECT_TIMEOUT_S
            )
            log.debug("connection %s relayed to %s:%d", peer, *self.target)
            up = _Pipe(self.delay_s, self.rate_bps, self.buffer_bytes)
            down = _Pipe(self.delay_s, self.rate_bps, self.buffer_bytes)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(up.read_from(c_reader))
                tg.create_task(up.write_to(t_writer))
                tg.create_task(down.read_from(t_reader))
                tg.create_task(down.write_to(c_writer))
        except* OSError as eg:  # includes connect timeouts and resets
            log.debug("connection %s ended: %s", peer, eg.exceptions[0])
        finally:
            for w in (c_writer, t_writer):
                if w is not None:
                    w.close()


class RelayThread:
    """A :class:`Relay` on its own event loop in a daemon thread (for tests).

    Use as a context manager; ``address`` is the bound (host, port).
    """

    def __init__(self, *args, **kwargs) -> None:
        self.relay = Relay(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.relay.address

    def start(self) -> RelayThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.relay.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.relay.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    relay = Relay(args.listen, args.target, args.delay_ms, args.rate_mbit,
                  args.buffer_kb * 1024 if args.buffer_kb else None)
    host, port = await relay.start()
    print(f"LISTENING {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay %s:%d stopping", host, port)
    await relay.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_hostport, required=True, help="host:port (port 0 = any)")
    parser.add_argument("--target", type=_hostport, required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    parser.add_argument("--rate-mbit", type=float, default=None, help="link rate per direction")
    parser.add_argument("--buffer-kb", type=int, default=None, help="in-flight cap per direction")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
