"""``bpo proxy``: BPO (and DRPO) in front of any OpenAI-compatible upstream, for clients that can't change.

Per request: find the user's prompt (the last user message of a chat, a Responses ``input``, a
completion ``prompt``), rewrite it with the core :class:`~bpo_plugins.Rewriter` (guards, cache,
micro-batching) within a time budget, optionally apply a DRPO alignment to the system prompt, then
forward the request and relay the answer byte for byte, streams chunk by chunk. Whatever goes wrong
with the rewrite, the original request goes on: the gateway never breaks the app behind it.

``X-BPO-Rewrite: off`` on a request skips the rewrite. Every answer carries ``X-BPO-Rewrite``:
``applied``, ``unchanged``, ``off``, ``fallback; reason=<reason>`` or ``skipped; reason=<why>``
(reasons only, never prompt text).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from bpo_plugins.batching import MicroBatcher
from bpo_plugins.chat import last_user_prompt
from bpo_plugins.rewriter import Rewriter
from bpo_plugins.server import openai_api as api
from bpo_plugins.server.asgi import BodyLimit, Endpoint, GatewayKeys
from bpo_plugins.server.config import GatewayConfig, Treatment
from bpo_plugins.server.metrics import GatewayMetrics
from bpo_plugins.server.openai_api import RequestError

log = logging.getLogger("bpo_plugins.server")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})
OPT_OUT_VALUES = ("off", "false", "0", "no")
#: Applies an alignment to a chat request body (DRPO: system prompt, examples, stop strings).
Aligner = Callable[..., dict[str, Any]]


@dataclass
class Outcome:
    """What the gateway did to one request, for the ``X-BPO-Rewrite`` header and the metrics."""

    status: str  # applied | unchanged | off | fallback | skipped
    reason: str | None = None

    @property
    def header(self) -> str:
        return self.status if self.reason is None else f"{self.status}; reason={self.reason}"


class Gateway:
    """The proxy's state (config, one pooled HTTP client, the rewriter) and its endpoints."""

    def __init__(self, config: GatewayConfig, rewriter: Rewriter | None = None) -> None:
        self.config = config
        if rewriter is None and config.rewrites_anything:
            rewriter = Rewriter.from_spec(
                config.optimizer, backend=config.optimizer_backend, base_url=config.optimizer_base_url,
                timeout_s=config.rewrite_timeout_s, cache_path=config.cache_path,
            )
        self.rewriter = rewriter
        self.batcher = None if rewriter is None else MicroBatcher(
            rewriter, window_ms=config.batch_window_ms, max_batch=config.max_batch, enabled=config.batch_enabled)
        self.aligners = load_aligners(config)
        self.metrics = GatewayMetrics()
        self.client: httpx2.AsyncClient | None = None
        self.upstream = config.upstream.rstrip("/")
        self._warmup: asyncio.Task[Any] | None = None

    # -- lifespan -----------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        cfg = self.config
        # httpx2 (httpx's maintained successor by the same author) rather than httpx: its pool relays
        # 1.2x the requests per second at 64 concurrent streams here (benchmarks/RESULTS.md).
        self.client = httpx2.AsyncClient(
            timeout=httpx2.Timeout(cfg.upstream_timeout_s, connect=cfg.connect_timeout_s, pool=cfg.connect_timeout_s),
            # Idle upstream connections expire after 2 s: servers close idle ones after 5 s (uvicorn) or
            # more, and a connection reused just as the server closes it fails the request.
            limits=httpx2.Limits(max_connections=cfg.max_connections, max_keepalive_connections=min(cfg.max_connections, 200),
                                keepalive_expiry=2.0),
            follow_redirects=False,
        )
        if self.rewriter is not None and not self.rewriter.loaded:
            # Load the optimizer in the background: the gateway relays (failing open) while it loads.
            self._warmup = asyncio.create_task(asyncio.to_thread(self.rewriter.warmup))
            self._warmup.add_done_callback(self._log_warmup)
        try:
            yield
        finally:
            if self._warmup is not None and not self._warmup.done():
                self._warmup.cancel()
            await self.client.aclose()

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
        ready = state != "loading" and self.client is not None
        return JSONResponse({"status": "ok" if ready else "loading", "rewriter": state}, status_code=200 if ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def chat_completions(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        messages = api.check_messages(body.get("messages"))
        treatment = self._treatment(body)
        original = last_user_prompt(messages)
        outcome = await self._rewrite_message(request, treatment, messages)
        aligner = self.aligners.get(treatment.drpo) if treatment.drpo else None
        if aligner is not None:  # examples are retrieved for the user's own words, as AlignmentPipeline does
            body = aligner(body, query=None if isinstance(original, str) else original.text)
        changed = outcome.status == "applied" or aligner is not None
        return await self.forward(request, "chat", outcome, json.dumps(body).encode() if changed else None)

    async def responses(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        if isinstance(body.get("input"), list):
            items = [item for item in body["input"] if isinstance(item, dict)]
            outcome = await self._rewrite_message(request, self._treatment(body), items)
        else:
            outcome = await self._rewrite_field(request, body, "input")
        # previous_response_id and every other field go upstream untouched.
        return await self.forward(request, "responses", outcome, json.dumps(body).encode() if outcome.status == "applied" else None)

    async def completions(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        outcome = await self._rewrite_field(request, body, "prompt")
        return await self.forward(request, "completions", outcome, json.dumps(body).encode() if outcome.status == "applied" else None)

    async def passthrough(self, request: Request) -> Response:
        endpoint = "models" if request.url.path.rstrip("/") == "/v1/models" else "passthrough"
        return await self.forward(request, endpoint, None, None)

    # -- rewriting ----------------------------------------------------------------------------

    async def _rewrite_field(self, request: Request, body: dict[str, Any], field: str) -> Outcome:
        """Rewrite a top-level text field (a Responses ``input``, a completion ``prompt``) in place."""
        treatment = self._treatment(body)
        if not isinstance(body.get(field), str):
            return self._count(Outcome("skipped", f"{field}_not_text"))
        message = {"role": "user", "content": body[field]}
        outcome = await self._rewrite_message(request, treatment, [message])
        body[field] = message["content"]
        return outcome

    def _treatment(self, body: dict[str, Any]) -> Treatment:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", param="model")
        return self.config.treatment(model or "")

    async def _rewrite_message(self, request: Request, treatment: Treatment, messages: list[dict[str, Any]]) -> Outcome:
        """Rewrite the text of the last user message in place; say what happened."""
        if request.headers.get("x-bpo-rewrite", "").strip().lower() in OPT_OUT_VALUES:
            return self._count(Outcome("off"))
        if not treatment.rewrite or self.batcher is None:
            return self._count(Outcome("skipped", "model_not_rewritten"))
        prompt = last_user_prompt(messages)
        if isinstance(prompt, str):
            return self._count(Outcome("skipped", prompt))
        if self.optimizer_state != "ready":
            return self._count(Outcome("fallback", f"optimizer_{self.optimizer_state}"))
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(self.batcher.rewrite(prompt.text, mode=treatment.mode),  # type: ignore[arg-type]
                                            self.config.rewrite_timeout_s)
        except asyncio.TimeoutError:
            return self._count(Outcome("fallback", "timeout"))
        except Exception as exc:  # noqa: BLE001 - fail open: the original prompt goes on
            log.warning("rewrite failed (%s); forwarding the original prompt", type(exc).__name__)
            return self._count(Outcome("fallback", "backend_error"))
        finally:
            self.metrics.rewrite_seconds.observe(time.perf_counter() - start)
        if result.fallback is not None:
            return self._count(Outcome("fallback", result.fallback.value))
        if not result.changed:
            return self._count(Outcome("unchanged"))
        prompt.replace(result.rewritten)
        return self._count(Outcome("applied"))

    def _count(self, outcome: Outcome) -> Outcome:
        self.metrics.rewrites.labels(outcome.status).inc()
        if outcome.status == "fallback":
            self.metrics.fallbacks.labels(outcome.reason or "unknown").inc()
        return outcome

    # -- forwarding ---------------------------------------------------------------------------

    def upstream_headers(self, request: Request) -> dict[str, str]:
        connection_named = {h.strip().lower() for h in request.headers.get("connection", "").split(",")}
        headers = {
            k: v for k, v in request.headers.items()
            if k not in HOP_BY_HOP and k not in connection_named and not k.startswith("x-bpo-")
        }
        headers.setdefault("accept-encoding", "identity")  # else httpx2 asks for gzip the client never wanted
        gateway_key_sent = request.scope.get("state", {}).get("gateway_key_in_authorization", False)
        if gateway_key_sent:
            headers.pop("authorization", None)
        if "authorization" not in headers and self.config.upstream_api_key:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        return headers

    async def forward(self, request: Request, endpoint: str, outcome: Outcome | None, body: bytes | None) -> Response:
        assert self.client is not None, "the gateway's lifespan has not started"
        path = request.url.path[len("/v1"):]
        content = body if body is not None else await request.body()
        upstream_request = self.client.build_request(
            request.method, self.upstream + path, params=request.query_params.multi_items(),
            headers=self.upstream_headers(request), content=content,
        )
        extra = {} if outcome is None else {"x-bpo-rewrite": outcome.header}
        start = time.perf_counter()
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx2.TimeoutException:
            return self._error(endpoint, 504, "the upstream did not answer within the gateway's timeout", "upstream_timeout", extra)
        except httpx2.HTTPError as exc:
            return self._error(endpoint, 502, f"cannot reach the upstream ({type(exc).__name__})", "upstream_unreachable", extra)
        request.state.cleanups.append(upstream.aclose)
        self.metrics.upstream_seconds.observe(time.perf_counter() - start)
        self.metrics.requests.labels(endpoint, str(upstream.status_code)).inc()
        headers = {k: v for k, v in upstream.headers.items() if k not in HOP_BY_HOP}
        headers.update(extra)
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            headers.update(api.SSE_HEADERS)
            return StreamingResponse(self.relay(upstream, endpoint), status_code=upstream.status_code, headers=headers)
        try:
            data = b"".join([chunk async for chunk in upstream.aiter_raw()])
        except httpx2.HTTPError as exc:
            return self._error(endpoint, 502, f"the upstream broke off its answer ({type(exc).__name__})", "upstream_broken", extra)
        return Response(data, status_code=upstream.status_code, headers=headers)

    async def relay(self, upstream: httpx2.Response, endpoint: str) -> AsyncIterator[bytes]:
        """Upstream SSE bytes as they arrive; a broken stream ends with an in-band error event."""
        self.metrics.open_streams.inc()
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx2.HTTPError as exc:
            kind = "upstream_timeout" if isinstance(exc, httpx2.TimeoutException) else "upstream_broken"
            message = f"the upstream stream broke off ({type(exc).__name__})"
            self.metrics.stream_errors.labels(kind).inc()
            if endpoint == "responses":
                yield api.sse({"type": "error", "code": kind, "message": message, "param": None}, event="error")
            else:
                yield api.sse(api.error_body(message, type="upstream_error", code=kind))
        finally:
            self.metrics.open_streams.dec()
            await upstream.aclose()

    def _error(self, endpoint: str, status: int, message: str, code: str, headers: dict[str, str]) -> Response:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        return RequestError(status, message, type="upstream_error", code=code).response(headers)

    # -- app ----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/v1/chat/completions", Endpoint(self._counted("chat", self.chat_completions)), methods=["POST"]),
            Route("/v1/responses", Endpoint(self._counted("responses", self.responses)), methods=["POST"]),
            Route("/v1/completions", Endpoint(self._counted("completions", self.completions)), methods=["POST"]),
            Route("/v1/{rest:path}", Endpoint(self._counted("passthrough", self.passthrough)),
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        ]

    def _counted(self, endpoint: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as error:
                self.metrics.requests.labels(endpoint, str(error.status)).inc()
                raise
        return run

    def app(self) -> Any:
        starlette = Starlette(routes=self.routes(), lifespan=self.lifespan)
        starlette.add_route("/", lambda request: PlainTextResponse("bpo proxy: point your OpenAI base_url at /v1\n"))
        return BodyLimit(GatewayKeys(starlette, self.config.gateway_keys), self.config.max_body_bytes)


def load_aligners(config: GatewayConfig) -> dict[str, Aligner]:
    """The DRPO alignment each configured treatment names, loaded once at start-up."""
    names = {t.drpo for _, t in config.models} | {config.default.drpo}
    names.discard(None)
    if not names:
        return {}
    from bpo_plugins.drpo import load_alignment

    return {name: load_alignment(name).apply_to_request for name in names if name is not None}


def build_gateway_app(config: GatewayConfig, rewriter: Rewriter | None = None) -> Any:
    """The ASGI app of ``bpo proxy`` (run it with uvicorn)."""
    return Gateway(config, rewriter).app()
