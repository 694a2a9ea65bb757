"""mDNS: workers announce themselves on the local link; clients and workers browse for them.

Each worker registers one `_corolla._tcp.local.` service per interface it
announces on (its own zeroconf per interface, so every link hears the address
that is reachable on it). TXT properties carry what a browser needs without
asking anyone: peer id, endpoint, model id, span, model size, dtype, protocol
version, throughput and the entry's version.

Records live MDNS_TTL_S = 10 s. A worker that leaves unregisters (a goodbye
packet: browsers drop it at once). One that dies just stops answering: a
browser re-asks for a record once half its TTL has gone by, and forgets the
service when the record lapses, so a dead worker is gone within 10 s (+1 s of
checking). zeroconf's own browser would keep it far longer: it clamps PTR
records to at least 1125 s, so liveness is judged on the SRV record here.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from zeroconf import DNSOutgoing, DNSQuestion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf._utils.time import current_time_millis
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_SRV, _TYPE_TXT

from corolla.discovery.entry import EntryError, PeerEntry
from corolla.discovery.interfaces import host_of

log = logging.getLogger(__name__)

SERVICE_TYPE = "_corolla._tcp.local."
MDNS_TTL_S = 10
REFRESH_AFTER = 0.5  # fraction of a record's TTL after which a browser asks for it again
CHECK_INTERVAL_S = 1.0
REQUERY_MIN_S = 1.0  # responders answer a record at most once a second anyway (RFC 6762, 6)
RESOLVE_TIMEOUT_MS = 3000


def properties(entry: PeerEntry, endpoint: str) -> dict[str, str]:
    return {"id": entry.peer_id, "ep": endpoint, "model": entry.model, "start": str(entry.start),
            "end": str(entry.end), "n": str(entry.num_blocks), "dtype": entry.dtype, "proto": str(entry.protocol),
            "tp": f"{entry.throughput:.6g}", "ver": str(entry.version)}


def entry_from(info: AsyncServiceInfo, now: float) -> PeerEntry:
    """A PeerEntry from a resolved service's TXT properties; EntryError if they do not describe a worker."""
    props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
    endpoints = [props["ep"]] if props.get("ep") else [f"tcp://{a}:{info.port}" for a in info.parsed_addresses()]
    try:
        wire = {"id": props["id"], "ep": endpoints, "model": props["model"], "start": int(props["start"]),
                "end": int(props["end"]), "n": int(props["n"]), "dtype": props.get("dtype", ""),
                "proto": int(props.get("proto", 0)), "tp": float(props.get("tp", 0)), "ver": int(props.get("ver", 0)),
                "hb": 0, "age": 0}
    except (KeyError, ValueError) as e:
        raise EntryError(f"TXT record of {info.name} is incomplete: {e}") from None
    return PeerEntry.from_wire(wire, now)


class MdnsAnnouncer:
    """A worker's registrations, one zeroconf per announced address; runs on the worker's event loop."""

    def __init__(self, entry: PeerEntry, addresses: list[str]):
        self.entry = entry
        self.addresses = addresses
        self._zeroconfs: list[tuple[AsyncZeroconf, str]] = []
        self._infos: list[AsyncServiceInfo] = []

    def _info(self, i: int, address: str) -> AsyncServiceInfo:
        endpoint = next((e for e in self.entry.endpoints if host_of(e) == address), self.entry.endpoint)
        return AsyncServiceInfo(SERVICE_TYPE, f"{self.entry.peer_id}-{i}.{SERVICE_TYPE}",
                                addresses=[socket.inet_aton(address)], port=_port(endpoint),
                                properties=properties(self.entry, endpoint),
                                server=f"corolla-{self.entry.peer_id}-{i}.local.",
                                host_ttl=MDNS_TTL_S, other_ttl=MDNS_TTL_S)

    async def start(self) -> None:
        """Register on every address; probing takes about a second, so call it from a background task."""
        for i, address in enumerate(self.addresses):
            zc = AsyncZeroconf(interfaces=[address])
            self._zeroconfs.append((zc, address))
            self._infos.append(self._info(i, address))
        await asyncio.gather(*(zc.async_register_service(info)
                               for (zc, _), info in zip(self._zeroconfs, self._infos)))
        log.info("announced over mDNS on %s", ", ".join(self.addresses))

    async def update(self, entry: PeerEntry) -> None:
        self.entry = entry
        self._infos = [self._info(i, a) for i, (_, a) in enumerate(self._zeroconfs)]
        await asyncio.gather(*(zc.async_update_service(info) for (zc, _), info in zip(self._zeroconfs, self._infos)))

    async def stop(self) -> None:
        """Unregister (browsers drop this worker at once) and close."""
        for zc, _ in self._zeroconfs:
            try:
                await zc.async_unregister_all_services()
            except Exception as e:  # a worker that is leaving anyway: log, never fail the shutdown
                log.warning("mDNS unregister: %s", e)
            await zc.async_close()
        self._zeroconfs, self._infos = [], []


class MdnsBrowser:
    """Finds workers on the local link; `on_put(entry)` / `on_drop(peer_id)` run on the loop it started on."""

    def __init__(self, addresses: list[str], on_put: Callable[[PeerEntry], None], on_drop: Callable[[str], None]):
        self.addresses = addresses
        self.on_put, self.on_drop = on_put, on_drop
        self.known: dict[str, PeerEntry] = {}  # service name -> entry
        self._asked: dict[str, float] = {}
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=self.addresses)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._spawn(self._maintain())
        log.info("browsing mDNS on %s", ", ".join(self.addresses))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._browser = self._zc = None

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._forget(name, "said goodbye")
        else:
            self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS service %s did not resolve", name)
            return
        try:
            entry = entry_from(info, time.monotonic())
        except EntryError as e:
            log.warning("ignoring mDNS service %s: %s", name, e)
            return
        if name not in self.known:
            log.info("found %s over mDNS: %s blocks %d:%d of %s", entry.peer_id, entry.endpoint, entry.start,
                     entry.end, entry.model)
        self.known[name] = entry
        self.on_put(entry)

    def _forget(self, name: str, why: str) -> None:
        entry = self.known.pop(name, None)
        if entry is None:
            return
        log.info("lost %s over mDNS: %s", entry.peer_id, why)
        twin = next((e for e in self.known.values() if e.peer_id == entry.peer_id), None)
        if twin is not None:  # the same worker is still heard on another interface
            self.on_put(twin)
        else:
            self.on_drop(entry.peer_id)

    async def _maintain(self) -> None:
        """Re-ask for records past half their TTL; forget services whose SRV record lapsed."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            zc = self._zc.zeroconf
            now_ms = current_time_millis()
            query = DNSOutgoing(_FLAGS_QR_QUERY)
            for name in list(self.known):
                records = [r for r in zc.cache.get_all_by_details(name, _TYPE_SRV, _CLASS_IN) if not r.is_expired(now_ms)]
                if not records:
                    self._forget(name, f"no answer for {MDNS_TTL_S} s")
                    continue
                newest = max(records, key=lambda r: r.created)
                asked = self._asked.get(name, 0.0)
                if now_ms - newest.created > REFRESH_AFTER * newest.ttl * 1000 and now_ms - asked > REQUERY_MIN_S * 1000:
                    query.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
                    query.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
                    self._asked[name] = now_ms
            if query.questions:
                zc.async_send(query)


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])
