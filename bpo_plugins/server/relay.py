"""The upstream relay: a request sent on to the OpenAI- or Anthropic-compatible upstream, with the
client's end-to-end headers and the right key, and its answer relayed byte for byte (streams chunk by
chunk, a broken stream ending in an in-band error event). The gateway decides what to send; this class sends it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from bpo_plugins import telemetry
from bpo_plugins.outcome import RequestOutcome
from bpo_plugins.server import anthropic_api
from bpo_plugins.server import openai_api as api
from bpo_plugins.server.config import GatewayConfig
from bpo_plugins.server.metrics import GatewayMetrics
from bpo_plugins.server.openai_api import RequestError
from bpo_plugins.server.upstream import (
    AiohttpClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

__all__ = ["ANTHROPIC_ENDPOINTS", "HOP_BY_HOP", "UpstreamRelay"]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})
#: Endpoints in Anthropic's wire format: their own errors are Anthropic-shaped.
ANTHROPIC_ENDPOINTS = frozenset({"messages", "count_tokens"})


class UpstreamRelay:
    """Sends requests upstream on one pooled client (set by the gateway's lifespan) and relays the answers."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.client: AiohttpClient | None = None
        self.upstream = config.upstream.rstrip("/")
        # The anthropic client's base URL has no /v1; the OpenAI-style upstream's has.
        self.anthropic_upstream = (config.anthropic_upstream.rstrip("/") + "/v1") if config.anthropic_upstream else self.upstream
        #: (tracer, provider) when OTEL_* asks for traces; None keeps OpenTelemetry off the hot path.
        self.tracing: tuple[Any, Any] | None = None

    def upstream_headers(self, request: Request, anthropic: bool = False) -> dict[str, str]:
        """The client's end-to-end headers (``anthropic-version``, ``anthropic-beta``, ``openai-*``,
        idempotency keys...) less hop-by-hop ones and ours; the client's key goes on, a gateway key
        is swapped for the upstream key (``x-api-key`` for Anthropic, a Bearer token otherwise)."""
        headers: dict[str, str] = {}
        connection = b""
        for key, value in request.scope["headers"]:  # raw ASGI headers: names already lower-case
            if key == b"connection":
                connection = value
            name = key.decode("latin-1")
            if name not in HOP_BY_HOP and not name.startswith("x-bpo-"):
                headers[name] = value.decode("latin-1")
        for named in connection.decode("latin-1").split(",") if connection else ():
            headers.pop(named.strip().lower(), None)  # headers the Connection header names are hop-by-hop too
        headers.setdefault("accept-encoding", "identity")  # else the upstream may gzip what the client never asked to
        gateway_key_in = request.scope.get("state", {}).get("gateway_key_in")
        if gateway_key_in is not None:
            headers.pop(gateway_key_in, None)
        if anthropic:
            if "authorization" not in headers and "x-api-key" not in headers and self.config.upstream_anthropic_api_key:
                headers["x-api-key"] = self.config.upstream_anthropic_api_key
        elif "authorization" not in headers and self.config.upstream_api_key:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        return headers

    async def forward(self, request: Request, endpoint: str, outcome: RequestOutcome | None, body: bytes | None, *,
                      path: str | None = None, answer: api.ChatFromCompletion | None = None) -> Response:
        """Send the request (``body`` when it changed) upstream and relay the answer. ``path``: another
        upstream path than the request's; ``answer``: turns a completions answer into a chat answer."""
        assert self.client is not None, "the gateway's lifespan has not started"
        extra = {} if outcome is None else {"x-bpo-rewrite": outcome.header}
        start = time.perf_counter()
        sent = await self._send(request, endpoint, path or request.url.path[len("/v1"):], body, extra, start)
        if isinstance(sent, Response):
            return sent
        return await self._answer(request, endpoint, sent, extra, answer, start)

    async def _send(self, request: Request, endpoint: str, path: str, body: bytes | None, extra: dict[str, str],
                    start: float) -> UpstreamResponse | Response:
        """The upstream's answer once its headers arrive, or the gateway's error response (502, 504)."""
        assert self.client is not None
        anthropic = endpoint in ANTHROPIC_ENDPOINTS
        content = body if body is not None else await request.body()
        url = (self.anthropic_upstream if anthropic else self.upstream) + path
        query = request.scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")  # as the client sent it, byte for byte
        span = None if self.tracing is None else self.tracing[0].start_span("bpo.gateway.upstream", kind=telemetry.span_kind("CLIENT"), attributes={
            "http.request.method": request.method, "server.address": urlsplit(url).hostname or "", "url.path": path})
        try:
            upstream = await self.client.send(request.method, url, self.upstream_headers(request, anthropic), content)
        except UpstreamTimeout:
            self._upstream_done(request, span, start, 504)
            return self._error(endpoint, 504, "the upstream did not answer within the gateway's timeout", "upstream_timeout", extra)
        except UpstreamUnreachable as exc:
            self._upstream_done(request, span, start, 502)
            return self._error(endpoint, 502, f"cannot reach the upstream ({exc})", "upstream_unreachable", extra)
        except BaseException:  # cancelled: the client hung up
            self._upstream_done(request, span, start, None)
            raise
        request.state.cleanups.append(upstream.aclose)
        self._upstream_done(request, span, start, upstream.status_code)
        self.metrics.requests.labels(endpoint, str(upstream.status_code)).inc()
        return upstream

    async def _answer(self, request: Request, endpoint: str, upstream: UpstreamResponse, extra: dict[str, str],
                      answer: api.ChatFromCompletion | None, start: float) -> Response:
        """The upstream's answer relayed: a stream chunk by chunk, else whole; translated by ``answer``."""
        headers = {k: v for k, v in upstream.headers.items() if k not in HOP_BY_HOP}
        headers.update(extra)
        translate = answer is not None and upstream.status_code == 200  # errors pass through verbatim
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            headers.update(api.SSE_HEADERS)
            chunks = self.chunks(upstream, endpoint)
            return StreamingResponse(answer.stream(chunks) if translate else chunks,  # type: ignore[union-attr]
                                     status_code=upstream.status_code, headers=headers)
        try:
            data = await upstream.read()
        except UpstreamError as exc:
            return self._error(endpoint, 502, f"the upstream broke off its answer ({exc})", "upstream_broken", extra)
        finally:
            request.state.bpo_upstream_s = time.perf_counter() - start  # the body's time is the upstream's too
        if translate:
            data = answer.response(data)  # type: ignore[union-attr]
        return Response(data, status_code=upstream.status_code, headers=headers)

    async def chunks(self, upstream: UpstreamResponse, endpoint: str) -> AsyncIterator[bytes]:
        """Upstream SSE bytes as they arrive; a broken stream ends with an in-band error event."""
        self.metrics.open_streams.inc()
        try:
            async for chunk in upstream.chunks():
                yield chunk
        except UpstreamError as exc:
            kind = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_broken"
            message = f"the upstream stream broke off ({exc})"
            self.metrics.stream_errors.labels(kind).inc()
            if endpoint == "responses":
                yield api.sse({"type": "error", "code": kind, "message": message, "param": None}, event="error")
            elif endpoint in ANTHROPIC_ENDPOINTS:
                yield anthropic_api.error_event(message, 504 if kind == "upstream_timeout" else 502)
            else:
                yield api.sse(api.error_body(message, type="upstream_error", code=kind))
        finally:
            self.metrics.open_streams.dec()
            await upstream.aclose()

    def _upstream_done(self, request: Request, span: Any, start: float, status: int | None) -> None:
        seconds = time.perf_counter() - start
        request.state.bpo_upstream_s = seconds
        self.metrics.upstream_seconds.observe(seconds)
        if span is not None:
            span.set_attribute("bpo.upstream.ttfb_ms", round(seconds * 1000, 3))
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            span.end()

    def _error(self, endpoint: str, status: int, message: str, code: str, headers: dict[str, str]) -> Response:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if endpoint in ANTHROPIC_ENDPOINTS:
            return anthropic_api.error_response(status, message, headers)
        return RequestError(status, message, type="upstream_error", code=code).response(headers)
