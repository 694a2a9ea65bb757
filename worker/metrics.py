"""A worker's Prometheus metrics, served over HTTP when `metrics_port` is set.

Requests are counted where they are answered (the bus server's observer), so
every kind, including malformed ones and gossip, is seen with its reply's
status, latency and size; session and cache gauges read the session table when
scraped, so they are never stale. Each worker keeps its own registry: tests
run several services in one process.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from corolla.bus.messages import Backward, Forward, Step
from corolla.bus.server import Answered
from corolla.worker.compute import PRIORITY_NAMES

log = logging.getLogger(__name__)

# A step of a small span on a CPU takes milliseconds; a long prefill or a backward pass seconds.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_KINDS = (Step, Forward, Backward)


class WorkerMetrics:
    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.requests = Counter("corolla_worker_requests", "Requests answered, by message kind and status (ok or the "
                                "error code)", ["kind", "status"], registry=self.registry)
        self.latency = Histogram("corolla_worker_request_seconds", "Time from receipt to reply, by message kind",
                                 ["kind"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.tokens = Counter("corolla_worker_tokens", "Tokens (batch x sequence) run through this worker's blocks, "
                              "by message kind", ["kind"], registry=self.registry)
        self.bytes = Counter("corolla_worker_bytes", "Message bytes received (in) and sent (out), by the activation "
                             "codec the sender asked for", ["direction", "codec"], registry=self.registry)
        self.compute = Histogram("corolla_worker_compute_seconds", "Time of each pass of the compute thread (one "
                                 "request, or decode steps batched together), by queue: the rest of a request's "
                                 "time is queueing, hand-offs and the bus", ["queue"], buckets=LATENCY_BUCKETS_S,
                                 registry=self.registry)
        service.compute.observer = lambda priority, seconds: self.compute.labels(PRIORITY_NAMES[priority]).observe(
            seconds)
        sessions = service.sessions
        Gauge("corolla_worker_sessions_open", "Inference sessions open", registry=self.registry).set_function(
            lambda: len(sessions))
        Gauge("corolla_worker_cache_tokens_used", "KV-cache tokens reserved by open sessions",
              registry=self.registry).set_function(lambda: sessions.used_tokens)
        Gauge("corolla_worker_cache_tokens_free", "KV-cache tokens free for new sessions",
              registry=self.registry).set_function(lambda: sessions.free_tokens)
        Gauge("corolla_worker_blocks", "Blocks this worker serves (end - start)",
              registry=self.registry).set_function(lambda: service.end - service.start)

    def observe(self, answered: Answered) -> None:
        """The bus server's observer: one call per answered request, on the worker's event loop."""
        self.requests.labels(answered.kind, answered.status).inc()
        self.latency.labels(answered.kind).observe(answered.seconds)
        self.bytes.labels("in", answered.codec).inc(answered.bytes_in)
        self.bytes.labels("out", answered.codec).inc(answered.bytes_out)
        if answered.status == "ok" and isinstance(answered.message, TOKEN_KINDS):
            self.tokens.labels(answered.kind).inc(answered.message.hidden.shape[0] * answered.message.hidden.shape[1])

    def serve(self, host: str, port: int):
        """Serve /metrics on host:port in a daemon thread; returns the HTTP server (shutdown() stops it)."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)
        return httpd
