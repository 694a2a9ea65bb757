"""perf/netem.py and perf/relay.py: topologies come up, carry traffic at the
profile's rate and delay, and leave nothing behind."""

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # perf/ is a plain directory, not part of the corolla package

from perf import netem  # noqa: E402
from perf.relay import RelayThread  # noqa: E402

_ok, _reason = netem.netns_available()
needs_netns = pytest.mark.skipif(not _ok, reason=f"network namespaces unavailable: {_reason}")

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], 0))
    print(f"LISTENING {sys.argv[1]}:{srv.getsockname()[1]}", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
""")


def _ours(run_id: str) -> list[str]:
    return [ns for ns in netem._list_netns() if ns.startswith(f"{netem.PREFIX}{run_id}-")]


def _echo_server(port: int = 0) -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        with srv:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


# -- relay alone (loopback, no namespaces needed) -------------------------
def test_relay_delays_each_direction_and_keeps_order():
    srv, port = _echo_server()
    with srv, RelayThread(("127.0.0.1", 0), ("127.0.0.1", port), delay_ms=50) as relay:
        with socket.create_connection(relay.address) as s:
            t0 = time.perf_counter()
            s.sendall(b"ping")
            assert netem._recv_exact(s, 4) == b"ping"
            rtt_ms = (time.perf_counter() - t0) * 1000
            assert 100 <= rtt_ms < 120
            payload = bytes(range(256)) * 4096  # 1 MiB of a recognisable pattern
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            assert netem._recv_exact(s, len(payload)) == payload
            sender.join()


def test_relay_rate_limit_pipelines():
    """100 ms RTT and 100 Mbit/s at once: the relay is a pipe, not stop-and-wait."""
    sink = socket.create_server(("127.0.0.1", 0))
    received = []

    def drain() -> None:
        conn, _ = sink.accept()
        with conn:
            conn.recv(1)
            t0, n = time.perf_counter(), 0
            while data := conn.recv(1 << 20):
                n += len(data)
            received.append(n * 8 / (time.perf_counter() - t0) / 1e6)

    t = threading.Thread(target=drain)
    t.start()
    with sink, RelayThread(("127.0.0.1", 0), sink.getsockname(), delay_ms=50, rate_mbit=100) as r:
        with socket.create_connection(r.address) as s:
            s.sendall(b"!")
            s.sendall(b"\0" * (15 << 20))
        t.join(10)
    assert 80 <= received[0] <= 120


# -- topologies ------------------------------------------------------------
def test_bad_hosts_rejected():
    with pytest.raises(ValueError):
        netem.Topology(["a", "a"])
    with pytest.raises(ValueError):
        netem.Topology(["has space"])


def test_loopback_profile_creates_nothing():
    with netem.Topology(["w1", "w2"], profile="loopback") as topo:
        assert topo.addr("w1") == topo.addr("w2") == "127.0.0.1"
        assert topo.command("w1", ["true"]) == ["true"]
        assert topo.delayed_endpoint("w1", "w2", 1234) == ("127.0.0.1", 1234)
        assert topo.run("w2", ["echo", "hi"]).stdout == "hi\n"


@pytest.mark.netns
@needs_netns
def test_topology_up_and_torn_down():
    with netem.Topology(["w1", "w2", "client"], profile="lan-100m") as topo:
        assert len(_ours(topo.run_id)) == 4  # three hosts + the bridge
        sleeper = topo.popen("w1", ["sleep", "60"])
        out = topo.run("client", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert topo.addr("client") + "/24" in out
        assert "tbf" in topo.run("w2", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert sleeper.poll() is not None
    assert _ours(topo.run_id) == []


@pytest.mark.netns
@needs_netns
def test_torn_down_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with netem.Topology(["a", "b"], profile="lan-1g") as topo:
            topo.popen("a", ["sleep", "60"])
            raise RuntimeError("boom")
    assert _ours(topo.run_id) == []


@pytest.mark.netns
@needs_netns
def test_tcp_echo_across_namespaces():
    with netem.Topology(["a", "b"], profile="lan-1g") as topo:
        server = topo.popen("b", [sys.executable, "-c", ECHO_SERVER, topo.addr("b")],
                            stdout=subprocess.PIPE)
        host, port = netem._read_listening(server)
        client = ("import socket, sys\n"
                  "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
                  "s.sendall(b'hello'); print(s.recv(5).decode())")
        assert host == topo.addr("b") != topo.addr("a")
        assert topo.run("a", [sys.executable, "-c", client, host, str(port)]).stdout == "hello\n"


@pytest.mark.netns
@needs_netns
def test_stale_namespaces_of_a_killed_run_are_removed():
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, sys.argv[1]); from perf import netem\n"
         "t = netem.Topology(['a', 'b'], profile='lan-100m').start()\n"
         "t.popen('a', ['sleep', '60']); print(t.run_id, flush=True); time.sleep(60)", str(ROOT)],
        stdout=subprocess.PIPE, text=True)
    try:
        run_id = child.stdout.readline().strip()
        leftovers = _ours(run_id)
        assert len(leftovers) == 3
    finally:
        child.kill()  # SIGKILL: no chance to tear down
        child.wait()
        child.stdout.close()
    assert set(leftovers) <= set(netem.cleanup_stale())
    assert _ours(run_id) == []


@pytest.mark.netns
@needs_netns
def test_tbf_shapes_to_100_mbit():
    with netem.Topology(["a", "b"], profile="lan-100m") as topo:
        m = netem.measure(topo, "a", "b", pings=10, max_seconds=2.0)
    assert 80 <= m.throughput_mbit <= 120, m
    assert m.rtt_p50_ms < 5, m


@pytest.mark.netns
@pytest.mark.slow
@needs_netns
def test_wan_relay_gives_100ms_rtt_and_still_pipelines():
    with netem.Topology(["a", "b"], profile="wan-100m-100ms") as topo:
        m = netem.measure(topo, "a", "b", pings=8, max_seconds=2.5)
    assert 80 <= m.rtt_p50_ms <= 120, m
    assert m.throughput_mbit >= 50, m


def test_sigterm_stops_relay_process():
    srv, port = _echo_server()
    with srv:
        proc = subprocess.Popen([sys.executable, str(netem.RELAY_SCRIPT), "--listen", "127.0.0.1:0",
                                 "--target", f"127.0.0.1:{port}", "--delay-ms", "5"],
                                stdout=subprocess.PIPE)
        try:
            host, rport = netem._read_listening(proc)
            with socket.create_connection((host, rport)) as s:
                s.sendall(b"x")
                assert netem._recv_exact(s, 1) == b"x"
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
