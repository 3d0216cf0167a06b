"""The gateway's Prometheus metrics, on a registry of its own (two gateways in one process don't clash)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Rewrites take 0.05-2 s on CPU; upstream first bytes from 1 ms (a cache) to a minute (a long prefill).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """Labels are closed sets (endpoint kinds, status codes, fallback reasons): a fuzzer's random
    paths cannot grow the registry, and no label ever holds a key or prompt text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("bpo_gateway_requests", "Requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.rewrites = Counter("bpo_gateway_rewrites", "Prompts seen, by outcome: applied, unchanged, off, fallback, skipped.",
                                ["outcome"], registry=self.registry)
        self.fallbacks = Counter("bpo_gateway_fallbacks", "Rewrites that fell back to the original prompt, by reason.",
                                 ["reason"], registry=self.registry)
        self.rewrite_seconds = Histogram("bpo_gateway_rewrite_seconds", "Time spent rewriting one prompt.",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream_seconds = Histogram("bpo_gateway_upstream_seconds", "Time to the upstream's response headers.",
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.open_streams = Gauge("bpo_gateway_open_streams", "Streams being relayed now.", registry=self.registry)
        self.stream_errors = Counter("bpo_gateway_stream_errors", "Upstream streams that broke off, by kind.",
                                     ["kind"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
