"""A scripted Anthropic-compatible upstream, run as its own process on 127.0.0.1 (plain ASGI under uvicorn).

It stands in for Anthropic's API, which cannot be reached here:
- ``POST /v1/messages``: a reply that only this request's last user text produces (:func:`reply_for`),
  as one Message or as Anthropic's SSE events (``message_start``, ``content_block_start``, ``ping``,
  one ``content_block_delta`` per word, ``content_block_stop``, ``message_delta``, ``message_stop``);
- ``POST /v1/messages/count_tokens``: ``{"input_tokens": <words in the request>}``;
- ``POST /v1/chat/completions``: the same reply in OpenAI's chat shape (the benchmark's chat route);
- ``GET /v1/received``: every request (path, query, body, headers), newest last (the last 5,000);
- ``GET /v1/events``: per ``x-test-id`` header, ``waiting``, ``open``, ``finished`` or ``closed``
  (the gateway hung up on it);
- fault switches in the ``x-test-fault`` header: ``latency=S`` (before the answer), ``status=CODE``
  (an Anthropic-shaped error with ``request-id`` and ``retry-after``), ``hang`` (no answer),
  ``reset`` (the connection drops after three deltas), ``trickle=S`` (S seconds between events).

    python tests/support/anthropic_server.py [--no-record]

It prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import uuid
from collections import deque
from typing import Any

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user turn: its string content, or its text blocks joined."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def reply_for(text: str, words: int = 24) -> str:
    """A reply that only this text produces: its hash, then numbered words."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"reply-{digest}: " + " ".join(f"w{i}" for i in range(words))


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def message(model: str, text: str, input_tokens: int) -> dict[str, Any]:
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": len(text.split())}}


def stream_events(model: str, text: str, input_tokens: int) -> list[bytes]:
    start = message(model, "", input_tokens)
    start.update(content=[], stop_reason=None, usage={"input_tokens": input_tokens, "output_tokens": 1})
    words = text.split(" ")
    return [
        event("message_start", {"type": "message_start", "message": start}),
        event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        event("ping", {"type": "ping"}),
        *[event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": w if i == 0 else " " + w}})
          for i, w in enumerate(words)],
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": len(words)}}),
        event("message_stop", {"type": "message_stop"}),
    ]


class AnthropicUpstream:
    def __init__(self, record: bool = True) -> None:
        self.record = record
        self.received: deque[dict[str, Any]] = deque(maxlen=5000)
        self.events: dict[str, str] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raw = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path, headers = scope["path"], {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/v1/received":
            return await self.send(send, 200, json.dumps({"received": list(self.received)}).encode())
        if path == "/v1/events":
            return await self.send(send, 200, json.dumps(self.events).encode())
        try:
            body = json.loads(raw) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {"_raw_bytes": len(raw)}
        if self.record:
            self.received.append({"path": path, "query": scope.get("query_string", b"").decode("latin-1"), "body": body, "headers": headers})
        body = body if isinstance(body, dict) else {}
        faults = dict(p.split("=", 1) if "=" in p else (p, "") for p in headers.get("x-test-fault", "").split(",") if p)
        test_id = headers.get("x-test-id", "")
        if test_id:
            self.events[test_id] = "waiting"
        wait = float(faults["latency"]) if "latency" in faults else 3600.0 if "hang" in faults else 0.0
        if wait:
            watcher = asyncio.ensure_future(receive())  # the gateway hanging up ends the wait
            done, _ = await asyncio.wait([watcher], timeout=wait)
            if done:
                if test_id:
                    self.events[test_id] = "closed"
                return
            watcher.cancel()
        if "status" in faults:
            code = int(faults["status"])
            error = {"type": "error", "error": {"type": ERROR_TYPES.get(code, "api_error"), "message": f"scripted {code}"}}
            return await self.send(send, code, json.dumps(error).encode(),
                                   {"request-id": "req_fault", "retry-after": "1", "x-should-retry": "true"})
        model = str(body.get("model", "claude-test"))
        text = reply_for(last_user_text(body))
        input_tokens = len(json.dumps(body.get("messages", "")).split())
        extra = {"request-id": f"req_{test_id or uuid.uuid4().hex[:12]}", "anthropic-ratelimit-requests-remaining": "99"}
        if path == "/v1/messages/count_tokens":
            return await self.send(send, 200, json.dumps({"input_tokens": input_tokens}).encode(), extra)
        if path == "/v1/chat/completions":
            completion = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": input_tokens, "completion_tokens": 25, "total_tokens": input_tokens + 25}}
            return await self.send(send, 200, json.dumps(completion).encode(), extra)
        if path != "/v1/messages":
            error = {"type": "error", "error": {"type": "not_found_error", "message": f"no route {path}"}}
            return await self.send(send, 404, json.dumps(error).encode())
        if not body.get("stream"):
            return await self.send(send, 200, json.dumps(message(model, text, input_tokens)).encode(), extra)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            *[(k.encode(), v.encode()) for k, v in extra.items()]]})
        if test_id:
            self.events[test_id] = "open"
        # Like Starlette's StreamingResponse: a disconnect (the gateway hanging up) stops the stream.
        streaming = asyncio.ensure_future(self.stream(send, model, text, input_tokens, faults, test_id))
        watcher = asyncio.ensure_future(receive())
        try:
            await asyncio.wait([streaming, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watcher):
                task.cancel()
            if test_id and self.events.get(test_id) == "open":
                self.events[test_id] = "closed"
        if streaming.done() and not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()  # type: ignore[misc]

    async def stream(self, send: Any, model: str, text: str, input_tokens: int, faults: dict[str, str], test_id: str) -> None:
        for i, frame in enumerate(stream_events(model, text, input_tokens)):
            if "reset" in faults and i == 6:
                raise ConnectionResetError("scripted reset")  # uvicorn drops the connection
            if "trickle" in faults and i:
                await asyncio.sleep(float(faults["trickle"]))
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if test_id:
            self.events[test_id] = "finished"

    @staticmethod
    async def send(send: Any, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            *[(k.encode(), v.encode()) for k, v in (headers or {}).items()]]})
        await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-record", action="store_true", help="keep no request log (benchmarks)")
    args = parser.parse_args()
    from bpo_plugins.server import serve_announced

    serve_announced(AnthropicUpstream(record=not args.no_record), "127.0.0.1", 0, lambda port: print(f"PORT {port}", flush=True))


if __name__ == "__main__":
    main()
