"""The gateway's Prometheus metrics, on a registry of its own (two gateways in one process don't clash).

Under ``--workers N`` each worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode, set up by the parent before the workers start) and ``/metrics``, whichever worker
answers it, adds up every worker's.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Rewrites take 0.05-2 s on CPU; upstream first bytes from 1 ms (a cache) to a minute (a long prefill).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The gateway's own time per request: tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class GatewayMetrics:
    """Labels are closed sets (endpoint kinds, status codes, fallback reasons): a fuzzer's random
    paths cannot grow the registry, and no label ever holds a key or prompt text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.requests = Counter("bpo_gateway_requests", "Requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.rewrites = Counter("bpo_gateway_rewrites", "Prompts seen, by outcome: applied, unchanged, off, fallback, skipped.",
                                ["outcome"], registry=self.registry)
        self.fallbacks = Counter("bpo_gateway_fallbacks", "Rewrites that fell back to the original prompt, by reason.",
                                 ["reason"], registry=self.registry)
        self.cache = Counter("bpo_gateway_cache", "Greedy rewrites answered from the cache (hit) or not (miss).",
                             ["result"], registry=self.registry)
        self.cache_errors = Counter("bpo_gateway_cache_errors", "Redis cache calls that failed or were skipped (a miss each), by kind.",
                                    ["kind"], registry=self.registry)
        self.rewrite_seconds = Histogram("bpo_gateway_rewrite_seconds", "Time spent rewriting one prompt.",
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream_seconds = Histogram("bpo_gateway_upstream_seconds", "Time to the upstream's response headers.",
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.overhead_seconds = Histogram("bpo_gateway_overhead_seconds", "The gateway's own time per request "
                                          "(the X-BPO-Overhead-Ms header: neither the upstream nor the rewrite).",
                                          buckets=OVERHEAD_BUCKETS, registry=self.registry)
        self.open_streams = Gauge("bpo_gateway_open_streams", "Streams being relayed now.", registry=self.registry,
                                  multiprocess_mode="livesum")
        self.stream_errors = Counter("bpo_gateway_stream_errors", "Upstream streams that broke off, by kind.",
                                     ["kind"], registry=self.registry)

    def render(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
