"""Network emulation for tests and benchmarks: hosts in namespaces on shaped links.

Layout of a :class:`Topology` (everything lives in namespaces this run creates,
so nothing is added to the root namespace and no traffic can leave it):

* one namespace per host, ``corolla-<pid>-<starttime>-<seq>-h-<host>``, with
  ``lo`` up and ``eth0`` = 10.77.0.<i+1>/24 (plus a 224.0.0.0/4 route so
  multicast discovery works); no default route;
* one bridge namespace ``corolla-<pid>-<starttime>-<seq>-br`` holding ``br0``
  and the peer end ``p<i>`` of every host's veth pair;
* rate: a ``tbf`` qdisc on both ends of each veth (host egress and bridge-port
  egress), i.e. each host has a full-duplex link of the profile's rate to a
  switch;
* latency: the kernel has no ``netem`` qdisc, so delay comes from user-space
  relays (``perf/relay.py``).  :meth:`Topology.delayed_endpoint` starts a
  relay *in the source host's namespace* listening on 127.0.0.1 and forwarding
  to the destination; the source connects to the returned address and sees the
  one-way delay in each direction (RTT = 2 x delay) while the bytes still cross
  the shaped link.

The pid and process start time in the names let :func:`cleanup_stale` tell
leftovers of dead runs from namespaces of live parallel runs.  The
``loopback`` profile creates nothing: every host is 127.0.0.1.

CLI::

    python perf/netem.py measure --profile lan-100m   # or --all
    python perf/netem.py cleanup
    python perf/netem.py check
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("corolla.perf.netem")

PREFIX = "corolla-"
SUBNET = "10.77.0"
RELAY_SCRIPT = Path(__file__).with_name("relay.py")
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-(\d+)-\d+-")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_seq = itertools.count()


class NetemError(RuntimeError):
    """A namespace/link/qdisc command failed."""


@dataclass(frozen=True)
class Profile:
    """A link: ``rate_mbit`` per direction (None = unshaped), ``delay_ms`` one way."""

    name: str
    rate_mbit: float | None
    delay_ms: float = 0.0
    namespaces: bool = True

    @property
    def rtt_target(self) -> str:
        return f"{2 * self.delay_ms:g}" if self.delay_ms else "<5"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("loopback", None, 0.0, namespaces=False),
        Profile("lan-1g", 1000.0),
        Profile("lan-100m", 100.0),
        Profile("wan-100m-100ms", 100.0, 50.0),
    )
}


def _sh(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(argv))
    res = subprocess.run(list(argv), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetemError(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
    return res


def _start_time(pid: int) -> int | None:
    """Process start time (clock ticks since boot); None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _run_id() -> str:
    pid = os.getpid()
    return f"{pid}-{_start_time(pid)}-{next(_seq)}"


def _list_netns() -> list[str]:
    out = _sh(["ip", "-j", "netns", "list"]).stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def _kill_netns_pids(ns: str) -> None:
    for pid in _sh(["ip", "netns", "pids", ns], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def cleanup_stale() -> list[str]:
    """Delete our namespaces (and processes in them) whose creating process is gone."""
    removed = []
    for ns in _list_netns():
        m = _NS_RE.match(ns)
        if m and _start_time(int(m[1])) != int(m[2]):
            _delete_netns(ns)
            removed.append(ns)
    if removed:
        log.info("removed stale namespaces: %s", " ".join(removed))
    return removed


@lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """Whether namespaces, veth pairs and tbf work here; the reason if not."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (platform is {sys.platform})"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' (iproute2) is not installed"
    ns = f"{PREFIX}{_run_id()}-probe"
    try:
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "-n", ns, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"])
        _sh(["tc", "-n", ns, "qdisc", "add", "dev", "va", "root", "tbf",
             "rate", "100mbit", "burst", "64kb", "latency", "20ms"])
    except NetemError as e:
        return False, f"network namespaces unusable: {e}"
    finally:
        _delete_netns(ns)
    return True, "ok"


def require_profiles(names, script: str) -> None:
    """Exit with a one-line message if any of the profiles `names` needs namespaces and they are unusable here."""
    ok, reason = netns_available()
    if not ok and any(PROFILES[n].namespaces for n in names):
        sys.exit(f"{script}: network namespaces unavailable here ({reason}); try --network loopback")


def _tbf_args(rate_mbit: float) -> list[str]:
    """tbf sized for the rate: burst >= rate/250 s (covers HZ=250 and up), 20 ms queue."""
    rate_bps = rate_mbit * 1e6
    burst = max(32 * 1024, int(rate_bps / 8 / 250))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "20ms"]


def _read_listening(proc: subprocess.Popen, timeout: float = 15.0) -> tuple[str, int]:
    """Wait for the child's ``LISTENING host:port`` line on its stdout pipe."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NetemError(f"{proc.args}: not listening after {timeout} s")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise NetemError(f"{proc.args}: exited ({proc.wait()}) before listening")
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith("LISTENING "):
        raise NetemError(f"{proc.args}: unexpected output {line!r}")
    host, _, port = line.split()[1].rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C while tearing down so a second Ctrl-C can't leave leftovers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda *_: got.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


class Topology:
    """Hosts joined by shaped links; a context manager that always tears down.

    ``Topology(["w1", "w2", "client"], profile="lan-100m")``; ``profile`` is a
    name from :data:`PROFILES` or a :class:`Profile`.  Processes started with
    :meth:`popen` / :meth:`delayed_endpoint` are killed on exit.
    """

    def __init__(self, hosts: Sequence[str], profile: str | Profile = "lan-100m") -> None:
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.hosts = list(hosts)
        if len(set(self.hosts)) != len(self.hosts) or not 0 < len(self.hosts) < 250:
            raise ValueError(f"need 1..249 distinct hosts, got {self.hosts}")
        for h in self.hosts:
            if not _HOST_RE.match(h):
                raise ValueError(f"bad host name {h!r}")
        self.run_id = _run_id()
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------
    def start(self) -> Topology:
        if self._started:
            raise RuntimeError("topology already started")
        self._started = True
        atexit.register(self.close)
        try:
            if self.profile.namespaces:
                self._build()
        except BaseException:
            self.close()
            raise
        log.info("topology %s up: %s on %s", self.run_id, self.profile.name,
                 ", ".join(f"{h}={self.addr(h)}" for h in self.hosts))
        return self

    def _build(self) -> None:
        ok, reason = netns_available()
        if not ok:
            raise NetemError(reason)
        cleanup_stale()
        br = f"{PREFIX}{self.run_id}-br"
        self._add_netns(br)
        _sh(["ip", "-n", br, "link", "add", "name", "br0", "type", "bridge"])
        _sh(["ip", "-n", br, "link", "set", "br0", "up"])
        for i, host in enumerate(self.hosts):
            ns, port = self.netns(host), f"p{i}"
            self._add_netns(ns)
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", ns, "link", "add", "name", "eth0", "type", "veth",
                 "peer", "name", port, "netns", br])
            _sh(["ip", "-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0"])
            _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _sh(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])
            _sh(["ip", "-n", br, "link", "set", port, "master", "br0", "up"])
            if self.profile.rate_mbit:
                tbf = _tbf_args(self.profile.rate_mbit)
                _sh(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *tbf])
                _sh(["tc", "-n", br, "qdisc", "add", "dev", port, "root", *tbf])

    def _add_netns(self, ns: str) -> None:
        _sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)

    def close(self) -> None:
        """Kill tracked processes, then delete the namespaces.  Idempotent."""
        atexit.unregister(self.close)
        with _sigint_deferred():
            procs, self._procs = self._procs, []
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 3.0
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d ignored SIGTERM; killing", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                for f in (p.stdin, p.stdout, p.stderr):
                    if f is not None:
                        f.close()
            namespaces, self._namespaces = self._namespaces, []
            for ns in reversed(namespaces):
                _delete_netns(ns)
            if namespaces:
                log.info("topology %s torn down", self.run_id)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hosts -----------------------------------------------------------
    def netns(self, host: str) -> str | None:
        """The host's namespace name (None for the loopback profile)."""
        self._check(host)
        return f"{PREFIX}{self.run_id}-h-{host}" if self.profile.namespaces else None

    def addr(self, host: str) -> str:
        """The IPv4 address other hosts reach ``host`` at."""
        self._check(host)
        if not self.profile.namespaces:
            return "127.0.0.1"
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the host's namespace."""
        ns = self.netns(host)
        return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)

    def popen(self, host: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a tracked process in ``host`` (own session, so teardown kills its group)."""
        kw.setdefault("start_new_session", True)
        if not kw["start_new_session"]:
            raise ValueError("tracked processes need their own session")
        proc = subprocess.Popen(self.command(host, argv), **kw)
        self._procs.append(proc)
        log.debug("started pid %d on %s: %s", proc.pid, host, " ".join(map(str, argv)))
        return proc

    def run(self, host: str, argv: Sequence[str], *, timeout: float = 30.0,
            check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a short command in ``host``; output captured as text by default."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(host, argv), timeout=timeout, check=check, **kw)

    def delayed_endpoint(self, src: str, dst: str, dst_port: int) -> tuple[str, int]:
        """Where ``src`` should connect to reach ``dst_port`` on ``dst`` with the profile's delay.

        With a delay, starts a relay in ``src``'s namespace on 127.0.0.1 (so only
        ``src`` can use it) forwarding to ``dst``; its in-flight cap is twice the
        bandwidth-delay product.  Without a delay, the direct address.
        """
        target = (self.addr(dst), dst_port)
        if not self.profile.delay_ms:
            return target
        rate_Bps = (self.profile.rate_mbit or 1000.0) * 1e6 / 8
        buffer_kb = max(1024, int(2 * rate_Bps * self.profile.delay_ms / 1000 / 1024))
        proc = self.popen(src, [
            sys.executable, str(RELAY_SCRIPT), "--listen", "127.0.0.1:0",
            "--target", f"{target[0]}:{target[1]}", "--delay-ms", str(self.profile.delay_ms),
            "--buffer-kb", str(buffer_kb), "--log-level", "WARNING",
        ], stdout=subprocess.PIPE)
        return _read_listening(proc)

    def _check(self, host: str) -> None:
        if host not in self.hosts:
            raise KeyError(f"unknown host {host!r}; hosts are {self.hosts}")


# -- measurement ---------------------------------------------------------
PING_SIZE = 64


@dataclass
class Measurement:
    """What a profile measured: ping-pong RTT and one-way bulk throughput."""

    profile: Profile
    rtt_p50_ms: float
    rtt_p90_ms: float
    throughput_mbit: float
    bulk_bytes: int
    bulk_seconds: float

    def __str__(self) -> str:
        p = self.profile
        rate = f"{p.rate_mbit:g}" if p.rate_mbit else "unshaped"
        return (f"{p.name}: rtt p50 {self.rtt_p50_ms:.2f} ms (target {p.rtt_target}), "
                f"throughput {self.throughput_mbit:.1f} Mbit/s (target {rate})")


def measure(topo: Topology, a: str, b: str, *, pings: int = 20,
            max_bytes: int = 50 * 2**20, max_seconds: float = 3.0) -> Measurement:
    """Measure a -> b over the path an app would use (through the relay if delayed).

    RTT: ``pings`` 64-byte ping-pongs on one TCP connection.  Throughput: a
    sends up to ``max_bytes`` for at most ``max_seconds``; b times the bytes
    from its first to its last read.
    """
    server = topo.popen(b, [sys.executable, __file__, "_serve", "--listen", f"{topo.addr(b)}:0"],
                        stdout=subprocess.PIPE)
    try:
        _, port = _read_listening(server)
        host, port = topo.delayed_endpoint(a, b, port)
        res = topo.run(a, [sys.executable, __file__, "_probe", "--target", f"{host}:{port}",
                           "--pings", str(pings), "--max-bytes", str(max_bytes),
                           "--max-seconds", str(max_seconds)],
                       timeout=max_seconds + pings * (2 * topo.profile.delay_ms / 1000 + 1) + 30)
    finally:
        server.terminate()
    out = json.loads(res.stdout)
    q = statistics.quantiles(out["rtts_ms"], n=10)
    return Measurement(topo.profile, statistics.median(out["rtts_ms"]), q[8],
                       out["bytes"] * 8 / out["seconds"] / 1e6, out["bytes"], out["seconds"])


def _serve(listen: tuple[str, int]) -> None:
    """Measurement server: 'P' = echo PING_SIZE messages, 'B' = sink then report JSON."""
    srv = socket.create_server(listen)
    print(f"LISTENING {listen[0]}:{srv.getsockname()[1]}", flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            mode = conn.recv(1)
            if mode == b"P":
                while data := conn.recv(65536):
                    conn.sendall(data)
            elif mode == b"B":
                first = last = None
                n = 0
                while data := conn.recv(1 << 20):
                    last = time.monotonic()
                    if first is None:
                        first = last  # bytes of the first read arrived before t=first
                    else:
                        n += len(data)
                conn.sendall(json.dumps({"bytes": n, "seconds": last - first}).encode())

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


def _probe(target: tuple[str, int], pings: int, max_bytes: int, max_seconds: float) -> dict:
    """Measurement client: ping-pong, then bulk; returns the raw figures."""
    with socket.create_connection(target, timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"P")
        msg = b"x" * PING_SIZE
        rtts = []
        for i in range(pings + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            s.sendall(msg)
            _recv_exact(s, PING_SIZE)
            if i >= 2:
                rtts.append((time.perf_counter() - t0) * 1000)
    with socket.create_connection(target, timeout=max_seconds + 30) as s:
        s.sendall(b"B")
        block = b"\0" * (1 << 20)
        sent, t_end = 0, time.monotonic() + max_seconds
        while sent < max_bytes and time.monotonic() < t_end:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        report = b""
        while data := s.recv(4096):
            report += data
    return {"rtts_ms": rtts, **json.loads(report)}


# -- CLI -----------------------------------------------------------------
def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="build a 2-host topology per profile and measure it")
    m.add_argument("--profile", action="append", choices=list(PROFILES))
    m.add_argument("--all", action="store_true", help="every profile")
    m.add_argument("--max-seconds", type=float, default=3.0)
    m.add_argument("--max-mb", type=int, default=50)
    m.add_argument("--pings", type=int, default=20)
    sub.add_parser("cleanup", help="remove namespaces left by dead runs")
    sub.add_parser("check", help="tell whether namespaces are usable here")
    s = sub.add_parser("_serve")
    s.add_argument("--listen", type=_hostport, required=True)
    p = sub.add_parser("_probe")
    p.add_argument("--target", type=_hostport, required=True)
    p.add_argument("--pings", type=int, required=True)
    p.add_argument("--max-bytes", type=int, required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_exit)

    if args.cmd == "_serve":
        _serve(args.listen)
    elif args.cmd == "_probe":
        print(json.dumps(_probe(args.target, args.pings, args.max_bytes, args.max_seconds)))
    elif args.cmd == "check":
        ok, reason = netns_available()
        print(f"network namespaces: {'usable' if ok else 'NOT usable'} ({reason})")
        return 0 if ok else 1
    elif args.cmd == "cleanup":
        removed = cleanup_stale()
        print(f"removed {len(removed)} stale namespace(s)" + "".join(f"\n  {n}" for n in removed))
    else:
        names = list(PROFILES) if args.all else (args.profile or ["lan-100m"])
        for name in names:
            with Topology(["a", "b"], profile=name) as topo:
                print(measure(topo, "a", "b", pings=args.pings, max_bytes=args.max_mb * 2**20,
                              max_seconds=args.max_seconds), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # topologies were already torn down by their __exit__
        sys.exit(130)
