"""OpenTelemetry spans for rewrites and for ``bpo proxy``, only where someone asked for traces.

- The :class:`~bpo_plugins.Rewriter` records one ``bpo.rewrite`` span per prompt when the application
  has set a tracer provider (``opentelemetry.trace.set_tracer_provider``), so LangChain, LlamaIndex and
  DSPy users see BPO in their own traces. Without one it costs a dictionary lookup: OpenTelemetry is
  never imported here.
- ``bpo proxy`` sets up the SDK and the OTLP exporter (:func:`gateway_tracer`) when the standard
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` variable is set; the SDK
  reads the rest (``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_SERVICE_NAME``, headers, timeouts).

Spans carry outcomes, reasons, models, timings and status codes: never a key or a header. Prompt text
goes in only with ``BPO_OTEL_CAPTURE_PROMPTS=1``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bpo_plugins.outcome import RequestOutcome

if TYPE_CHECKING:
    from bpo_plugins.result import RewriteResult

CAPTURE_PROMPTS_ENV = "BPO_OTEL_CAPTURE_PROMPTS"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
INSTRUMENTATION = "bpo_plugins"


def capture_prompts() -> bool:
    return os.environ.get(CAPTURE_PROMPTS_ENV, "").strip() == "1"


def app_tracer() -> Any | None:
    """A tracer from the tracer provider the application set, or None (no provider, or no OpenTelemetry)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer(INSTRUMENTATION)


def outcome_attributes(outcome: RequestOutcome) -> dict[str, Any]:
    """What a span may say about one rewrite: outcome, reason, cache, model, duration (text only if asked)."""
    attributes: dict[str, Any] = {"bpo.rewrite.outcome": outcome.status, "bpo.rewrite.cache": outcome.cache,
                                  "bpo.rewrite.duration_ms": round(outcome.rewrite_s * 1000, 3)}
    if outcome.reason:
        attributes["bpo.rewrite.fallback_reason" if outcome.status == "fallback" else "bpo.rewrite.reason"] = outcome.reason
    result = outcome.result
    if result is not None:
        attributes.update({"bpo.rewrite.mode": result.mode, "bpo.optimizer.backend": result.backend,
                           "bpo.optimizer.model": result.model, "bpo.rewrite.output_tokens": result.output_tokens})
        if capture_prompts():
            attributes["bpo.prompt"], attributes["bpo.rewritten"] = result.original, result.rewritten
    return attributes


def rewrite_attributes(result: RewriteResult) -> dict[str, Any]:
    """:func:`outcome_attributes` of one finished rewrite."""
    return outcome_attributes(RequestOutcome.of(result, result.latency_s))


def record_rewrites(results: Sequence[RewriteResult], start: float) -> None:
    """One ``bpo.rewrite`` span per result, from ``start`` (a ``time.perf_counter()``) to now, when a
    tracer provider is set; nothing otherwise."""
    tracer = app_tracer()
    if tracer is None:
        return
    start_ns = time.time_ns() - int((time.perf_counter() - start) * 1e9)
    for result in results:
        tracer.start_span("bpo.rewrite", start_time=start_ns, attributes=rewrite_attributes(result)).end()


def tracing_requested(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ) if env is None else env
    return any(env.get(name) for name in ENDPOINT_ENVS) and env.get("OTEL_SDK_DISABLED", "").lower() != "true"


def gateway_tracer(service_name: str = "bpo-proxy") -> tuple[Any, Any] | None:
    """(tracer, provider) exporting over OTLP when the ``OTEL_*`` variables ask for it, else None.

    The provider becomes the global one, so the Rewriter's spans go out with the gateway's.
    """
    if not tracing_requested():
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    elif protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc "
                             "(or use http/protobuf)") from None
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use http/protobuf or grpc")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider.get_tracer(INSTRUMENTATION), provider


def span_kind(name: str) -> Any:
    """OpenTelemetry's ``SpanKind`` by name, imported only once tracing is on."""
    from opentelemetry.trace import SpanKind

    return SpanKind[name]
