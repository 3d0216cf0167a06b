"""``bpo proxy``: BPO (and DRPO) in front of any OpenAI- or Anthropic-compatible upstream, for clients that can't change.

Per request: find the user's prompt (the last user message of a chat, a Responses ``input``, a
completion ``prompt``), rewrite it with the core :class:`~bpo_plugins.Rewriter` (guards, cache,
micro-batching) within a time budget, optionally apply a DRPO alignment to the system prompt, then
forward the request and relay the answer byte for byte, streams chunk by chunk. Whatever goes wrong
with the rewrite, the original request goes on: the gateway never breaks the app behind it.

Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) goes to
``anthropic_upstream`` (else ``upstream``): the last user turn's text is rewritten, a DRPO alignment
goes into the top-level ``system``, and the gateway's own errors are Anthropic-shaped.

``X-BPO-Rewrite: off`` on a request skips the rewrite. Every answer carries ``X-BPO-Rewrite``:
``applied``, ``unchanged``, ``off``, ``fallback; reason=<reason>`` or ``skipped; reason=<why>``
(reasons only, never prompt text), and ``X-BPO-Overhead-Ms``, ``X-BPO-Rewrite-Ms`` and
``X-BPO-Cache`` (:class:`~bpo_plugins.server.asgi.Timings`). With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set,
each request is traced (request, rewrite and upstream spans; :mod:`bpo_plugins.telemetry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bpo_plugins import telemetry
from bpo_plugins.batching import MicroBatcher
from bpo_plugins.cache import RedisRewriteCache
from bpo_plugins.outcome import RequestOutcome, Shape
from bpo_plugins.request_rewriter import RequestRewriter
from bpo_plugins.rewriter import Rewriter
from bpo_plugins.server import anthropic_api
from bpo_plugins.server import openai_api as api
from bpo_plugins.server.asgi import BodyLimit, Endpoint, GatewayKeys, Timings
from bpo_plugins.server.config import GatewayConfig, Treatment
from bpo_plugins.server.metrics import GatewayMetrics
from bpo_plugins.server.openai_api import RequestError
from bpo_plugins.server.relay import ANTHROPIC_ENDPOINTS, UpstreamRelay
from bpo_plugins.server.upstream import (
    make_client,
)

if TYPE_CHECKING:
    from bpo_plugins.drpo.alignment import Alignment

log = logging.getLogger("bpo_plugins.server")

OPT_OUT_VALUES = ("off", "false", "0", "no")


class Gateway:
    """The proxy's state (config, one pooled HTTP client, the rewriter) and its endpoints."""

    def __init__(self, config: GatewayConfig, rewriter: Rewriter | None = None) -> None:
        self.config = config
        if rewriter is None and config.rewrites_anything:
            rewriter = Rewriter.from_spec(
                config.optimizer, backend=config.optimizer_backend, base_url=config.optimizer_base_url,
                timeout_s=config.rewrite_timeout_s, cache_path=config.cache_path, cache_url=config.cache_url,
            )
        self.rewriter = rewriter
        self.batcher = None if rewriter is None else MicroBatcher(
            rewriter, window_ms=config.batch_window_ms, max_batch=config.max_batch, enabled=config.batch_enabled)
        self.requests = RequestRewriter(
            None if self.batcher is None else (lambda text, mode: self.batcher.rewrite(text, mode=mode)),  # type: ignore[union-attr]
            timeout_s=config.rewrite_timeout_s)
        self.alignments = load_alignments(config)
        self.metrics = GatewayMetrics()
        if rewriter is not None and isinstance(rewriter.cache, RedisRewriteCache):
            rewriter.cache.on_error = lambda kind: self.metrics.cache_errors.labels(kind).inc()
        self.relay = UpstreamRelay(config, self.metrics)
        self._warmup: asyncio.Task[Any] | None = None

    # -- lifespan -----------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self.relay.client = make_client(self.config)
        self.relay.tracing = telemetry.gateway_tracer()
        if self.rewriter is not None and not self.rewriter.loaded:
            # Load the optimizer in the background: the gateway relays (failing open) while it loads.
            self._warmup = asyncio.create_task(asyncio.to_thread(self.rewriter.warmup))
            self._warmup.add_done_callback(self._log_warmup)
        try:
            yield
        finally:
            if self._warmup is not None and not self._warmup.done():
                self._warmup.cancel()
            await self.relay.client.aclose()
            if self.relay.tracing is not None:
                await asyncio.to_thread(self.relay.tracing[1].shutdown)  # flush the last spans
            if self.metrics.multiprocess:  # a worker that stops takes its live gauges (open streams) with it
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())

    @staticmethod
    def _log_warmup(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the optimizer failed to load (%s); every prompt goes on unrewritten", task.exception())

    @property
    def optimizer_state(self) -> str:
        """``ready``, ``loading`` or ``failed`` (a load is tried once, never again per request)."""
        if self._warmup is None or (self._warmup.done() and not self._warmup.cancelled() and self._warmup.exception() is None):
            return "ready"
        return "loading" if not self._warmup.done() else "failed"

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        # A failed optimizer still serves (every prompt falls back), so only loading is "not ready".
        state = self.optimizer_state
        ready = state != "loading" and self.relay.client is not None
        return JSONResponse({"status": "ok" if ready else "loading", "rewriter": state}, status_code=200 if ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def chat_completions(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        api.check_messages(body.get("messages"))
        return await self._rewrite_and_forward(request, body, Shape.CHAT, "chat")

    async def responses(self, request: Request) -> Response:
        # previous_response_id and every other field go upstream untouched.
        return await self._rewrite_and_forward(request, api.parse_json_object(await request.body()), Shape.RESPONSES, "responses")

    async def completions(self, request: Request) -> Response:
        return await self._rewrite_and_forward(request, api.parse_json_object(await request.body()), Shape.COMPLETIONS, "completions")

    async def messages(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        anthropic_api.check_request(body)
        return await self._rewrite_and_forward(request, body, Shape.MESSAGES, "messages")

    async def count_tokens(self, request: Request) -> Response:
        return await self.forward(request, "count_tokens", None, None)

    async def passthrough(self, request: Request) -> Response:
        endpoint = "models" if request.url.path.rstrip("/") == "/v1/models" else "passthrough"
        return await self.forward(request, endpoint, None, None)

    # -- rewriting ----------------------------------------------------------------------------

    async def _rewrite_and_forward(self, request: Request, body: dict[str, Any], shape: Shape, endpoint: str) -> Response:
        """The core request rewriter on this request, under its model's treatment; then upstream."""
        treatment = self._treatment(body)
        alignment = self.alignments.get(treatment.drpo) if treatment.drpo else None
        state = self.optimizer_state
        rewrite = self.requests.arewrite(
            body, shape, mode=treatment.mode,  # type: ignore[arg-type]
            enabled=treatment.rewrite,
            opted_out=request.headers.get("x-bpo-rewrite", "").strip().lower() in OPT_OUT_VALUES,
            unavailable=None if state == "ready" else f"optimizer_{state}",
            alignment=alignment,
        )
        if self.relay.tracing is None:
            body, outcome = await rewrite
        else:
            with self.relay.tracing[0].start_as_current_span("bpo.gateway.rewrite") as span:
                body, outcome = await rewrite
                span.set_attributes(telemetry.outcome_attributes(outcome))
        self._count(outcome)
        request.state.bpo_rewrite_s = outcome.rewrite_s
        request.state.bpo_cache = outcome.cache
        if outcome.upstream_shape == Shape.COMPLETIONS:
            # A base model behind a raw DRPO preset: one completions call, answered as a chat completion.
            assert alignment is not None
            return await self.forward(request, endpoint, outcome, json.dumps(body).encode(), path="/completions",
                                      answer=api.ChatFromCompletion(alignment.answer))
        return await self.forward(request, endpoint, outcome, json.dumps(body).encode() if outcome.changed else None)

    def _treatment(self, body: dict[str, Any]) -> Treatment:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", param="model")
        return self.config.treatment(model or "")

    def _count(self, outcome: RequestOutcome) -> None:
        if outcome.cache != "off":
            self.metrics.cache.labels(outcome.cache).inc()
        self.metrics.rewrites.labels(outcome.status).inc()
        if outcome.status == "fallback":
            self.metrics.fallbacks.labels(outcome.reason or "unknown").inc()
        if outcome.rewrite_s:
            self.metrics.rewrite_seconds.observe(outcome.rewrite_s)

    # -- forwarding ---------------------------------------------------------------------------

    async def forward(self, request: Request, endpoint: str, outcome: RequestOutcome | None, body: bytes | None, *,
                      path: str | None = None, answer: api.ChatFromCompletion | None = None) -> Response:
        """The request relayed upstream (:meth:`UpstreamRelay.forward`)."""
        return await self.relay.forward(request, endpoint, outcome, body, path=path, answer=answer)

    # -- app ----------------------------------------------------------------------------------

    def model_routes(self) -> dict[str, Endpoint]:
        """The POST routes that rewrite, by exact path: the hot path."""
        return {
            "/v1/chat/completions": Endpoint(self._counted("chat", self.chat_completions)),
            "/v1/responses": Endpoint(self._counted("responses", self.responses)),
            "/v1/completions": Endpoint(self._counted("completions", self.completions)),
            "/v1/messages": Endpoint(self._counted("messages", self.messages)),
            "/v1/messages/count_tokens": Endpoint(self._counted("count_tokens", self.count_tokens)),
        }

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            *[Route(path, endpoint, methods=["POST"]) for path, endpoint in self.model_routes().items()],
            Route("/v1/{rest:path}", Endpoint(self._counted("passthrough", self.passthrough)),
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        ]

    def _counted(self, endpoint: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        anthropic = endpoint in ANTHROPIC_ENDPOINTS

        async def counted(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as error:
                self.metrics.requests.labels(endpoint, str(error.status)).inc()
                if anthropic:
                    return anthropic_api.from_request_error(error)
                raise
            except Exception:
                if not anthropic:
                    raise
                log.exception("internal error on %s", request.url.path)  # never the body
                return anthropic_api.error_response(500, "internal server error")

        async def run(request: Request) -> Response:
            if self.relay.tracing is None:
                return await counted(request)
            # Route and method only: no query string, no header, no body.
            with self.relay.tracing[0].start_as_current_span("bpo.gateway.request", kind=telemetry.span_kind("SERVER"), attributes={
                    "http.request.method": request.method, "http.route": request.url.path if endpoint != "passthrough" else "/v1/*",
                    "bpo.endpoint": endpoint}) as span:
                response = await counted(request)
                span.set_attribute("http.response.status_code", response.status_code)
                return response
        return run

    def app(self) -> Any:
        starlette = Starlette(routes=self.routes(), lifespan=self.lifespan)
        starlette.add_route("/", lambda request: PlainTextResponse(
            "bpo proxy: point your OpenAI base_url at /v1, your Anthropic base URL (ANTHROPIC_BASE_URL) at /\n"))
        hot = self.model_routes()

        async def dispatch(scope: Any, receive: Any, send: Any) -> None:
            # The model routes skip Starlette's router and middleware (a fifth of the relay's time per
            # request, by py-spy); everything else (lifespan, probes, pass-through) goes through Starlette.
            if scope["type"] == "http" and scope["method"] == "POST":
                endpoint = hot.get(scope["path"])
                if endpoint is not None:
                    return await endpoint(scope, receive, send)
            await starlette(scope, receive, send)

        app = BodyLimit(GatewayKeys(dispatch, self.config.gateway_keys), self.config.max_body_bytes)
        return Timings(app, self.metrics.overhead_seconds.observe)


def load_alignments(config: GatewayConfig) -> dict[str, Alignment]:
    """The DRPO alignment each configured treatment names, loaded once at start-up."""
    names = {t.drpo for _, t in config.models} | {config.default.drpo}
    names.discard(None)
    if not names:
        return {}
    from bpo_plugins.drpo import load_alignment

    return {name: load_alignment(name) for name in names if name is not None}


def build_gateway_app(config: GatewayConfig, rewriter: Rewriter | None = None) -> Any:
    """The ASGI app of ``bpo proxy`` (run it with uvicorn)."""
    return Gateway(config, rewriter).app()
