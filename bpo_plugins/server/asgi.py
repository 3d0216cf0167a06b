"""Pure ASGI pieces the servers share: a body-size limit, gateway keys, disconnect-aware endpoints and
per-request timing headers.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which hides client disconnects: an
endpoint here is cancelled the moment its client hangs up, before the first token or mid-stream,
so the upstream request and any pending rewrite are cancelled with it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bpo_plugins.server import anthropic_api
from bpo_plugins.server.openai_api import RequestError

log = logging.getLogger("bpo_plugins.server")
Handler = Callable[[Request], Awaitable[Response]]


class BodyLimit:
    """Reads the whole request body (413 past ``max_bytes``) and replays it to the app.

    After the body, the app's ``receive`` is the server's again, so disconnects still arrive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestError(413, f"the request body is over the limit of {self.max_bytes} bytes", code="body_too_large")
        if scope["path"].startswith("/v1/messages"):
            return await anthropic_api.from_request_error(error)(scope, receive, send)
        await error.response()(scope, receive, send)


class GatewayKeys:
    """Rejects requests without one of ``keys`` (``Authorization: Bearer``, ``X-API-Key`` as Anthropic
    clients send it, or ``X-BPO-Key``), so a deployment is no open relay. Health, readiness and
    metrics stay open for probes and scrapers.

    A key that came in ``Authorization`` or ``X-API-Key`` is the gateway's, not the upstream's: the
    scope says which header held it (``gateway_key_in``) so the proxy sends the upstream key instead.
    Keys are compared in constant time and never logged. Anthropic routes get Anthropic's error shape.
    """

    OPEN_PATHS = ("/health", "/ready", "/metrics")

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"")
        bearer = bearer[7:].strip() if bearer[:7].lower() == b"bearer " else b""
        state = scope.setdefault("state", {})
        if self._known(headers.get(b"x-bpo-key", b"")):
            state["gateway_key_in"] = None
        elif self._known(bearer):
            state["gateway_key_in"] = "authorization"
        elif self._known(headers.get(b"x-api-key", b"").strip()):
            state["gateway_key_in"] = "x-api-key"
        else:
            if scope["path"].startswith("/v1/messages"):
                return await anthropic_api.error_response(401, "missing or unknown gateway key")(scope, receive, send)
            error = RequestError(401, "missing or unknown gateway key", type="authentication_error", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _known(self, candidate: bytes) -> bool:
        # Check every key, so timing tells nothing about which one was close.
        return bool(candidate) and sum(hmac.compare_digest(candidate, key) for key in self.keys) > 0


async def _never() -> Message:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


class Endpoint:
    """An ASGI endpoint that runs ``handler`` and sends its response, cancelling both on disconnect.

    Starlette only notices a disconnect when the next chunk fails to send (ASGI spec 2.4), which never
    happens while the upstream hangs or a rewrite runs. Here a watcher owns ``receive`` after the body
    and cancels the whole exchange on ``http.disconnect``; ``request.state.cleanups`` (closing the
    upstream response, say) run even then. :class:`RequestError` becomes its JSON error.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        await request.body()  # the body is read before the watcher takes over receive
        request.state.cleanups = []
        # Plain asyncio rather than an anyio task group: one small task per request (the gateway's hot path).
        task = asyncio.current_task()
        assert task is not None
        hung_up = False

        async def watch() -> None:
            nonlocal hung_up
            while (await receive())["type"] != "http.disconnect":
                pass
            hung_up = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            try:
                response = await self.handler(request)
            except RequestError as error:
                response = error.response()
            except Exception:  # a bug of ours: an OpenAI-shaped 500, logged without the body
                log.exception("internal error on %s", scope.get("path"))
                response = RequestError(500, "internal server error", type="server_error").response()
            # The response gets a receive that never answers: only the watcher reads disconnects.
            await response(scope, _never, send)
        except asyncio.CancelledError:
            if not hung_up:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+
                task.uncancel()  # the client left: the exchange ends here, quietly
        finally:
            watcher.cancel()
            for cleanup in reversed(request.state.cleanups):
                try:
                    await cleanup()
                except Exception:  # noqa: BLE001 - a failed close must not mask the real outcome
                    log.debug("cleanup failed", exc_info=True)


class Timings:
    """The outermost layer: every response's headers say what the gateway itself cost.

    - ``X-BPO-Overhead-Ms``: from the first byte of the request to the response headers, less the
      upstream's time and the rewrite's (the gateway's own work: parsing, routing, relaying);
    - ``X-BPO-Rewrite-Ms``: the rewrite's time (0 when none ran);
    - ``X-BPO-Cache``: ``hit``, ``miss`` or ``off`` for the rewrite cache.

    Handlers report into the request's state (``bpo_upstream_s``, ``bpo_rewrite_s``, ``bpo_cache``).
    Streams carry the headers too: they go out before the first byte.
    """

    def __init__(self, app: ASGIApp, observe: Callable[[float], None] | None = None) -> None:
        self.app, self.observe = app, observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                rewrite = state.get("bpo_rewrite_s", 0.0)
                overhead = max(0.0, time.perf_counter() - start - rewrite - state.get("bpo_upstream_s", 0.0))
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), (b"x-bpo-overhead-ms", b"%.3f" % (overhead * 1000)),
                                      (b"x-bpo-rewrite-ms", b"%.3f" % (rewrite * 1000)),
                                      (b"x-bpo-cache", state.get("bpo_cache", "off").encode())]
                if self.observe is not None:
                    self.observe(overhead)
            await send(message)

        await self.app(scope, receive, stamped)
