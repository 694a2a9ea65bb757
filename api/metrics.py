"""The API's Prometheus metrics, served at /metrics; one registry per app so several apps can share a process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Requests run from milliseconds (an error, /v1/models) to minutes (a long reply on CPU workers).
REQUEST_BUCKETS_S = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("corolla_api_requests", "HTTP requests, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram("corolla_api_request_seconds", "Time to the response's first byte, by route",
                                         ["route"], buckets=REQUEST_BUCKETS_S, registry=self.registry)
        self.first_token = Histogram("corolla_api_first_token_seconds", "Time from the start of generation to the "
                                     "first new token (prefill through the chain)", ["model"],
                                     buckets=FIRST_TOKEN_BUCKETS_S, registry=self.registry)
        self.token_seconds = Histogram("corolla_api_token_seconds", "Mean time per new token after the first, "
                                       "per generation", ["model"], buckets=TOKEN_BUCKETS_S, registry=self.registry)
        self.tokens = Counter("corolla_api_tokens", "Tokens served, by model and kind (prompt or completion)",
                              ["model", "kind"], registry=self.registry)
        self.generations = Counter("corolla_api_generations", "Finished generations, by model and finish reason "
                                   "(stop, length, cancelled, error)", ["model", "reason"], registry=self.registry)
        self.sessions_open = Gauge("corolla_api_sessions_open", "Generations running now, each holding an inference "
                                   "session on the workers", ["model"], registry=self.registry)
