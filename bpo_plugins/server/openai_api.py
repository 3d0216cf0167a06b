"""OpenAI's wire format, as the gateway and ``bpo serve`` read and write it: errors, SSE frames, bodies.

Only what both servers need to agree on lives here; routing and policy are in ``gateway.py`` and
``local.py``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from starlette.responses import JSONResponse

from bpo_plugins.chat import content_text  # noqa: F401 - the servers read message text through this module

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE_FRAME = b"data: [DONE]\n\n"


class RequestError(Exception):
    """A client error, answered as ``{"error": {...}}`` with ``status`` (never a 500)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event: ``event:`` (Responses API) then ``data:``, ended by a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RequestError(400, "the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def check_messages(messages: Any, param: str = "messages") -> list[dict[str, Any]]:
    """A chat ``messages`` list, type-checked as far as the servers read it."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f"'{param}' must be a non-empty list of messages", param=param)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"'{param}[{i}]' must be an object with a string 'role'", param=f"{param}[{i}]")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(400, f"'{param}[{i}].content' must be a string or a list of parts", param=f"{param}[{i}].content")
    return messages


def number(body: dict[str, Any], name: str, default: float, *, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{name}' must be a number in [{low}, {high}]", param=name)
    return float(value)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(model: str, texts: Sequence[str], prompt_tokens: int, completion_tokens: int,
                    finish_reasons: Sequence[str] = ()) -> dict[str, Any]:
    finish_reasons = finish_reasons or ["stop"] * len(texts)
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
            for i, (text, finish) in enumerate(zip(texts, finish_reasons))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(id: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk (``choices: []``)."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def text_completion(model: str, texts: Sequence[str], prompt_tokens: int, completion_tokens: int,
                    finish_reasons: Sequence[str] = ()) -> dict[str, Any]:
    finish_reasons = finish_reasons or ["stop"] * len(texts)
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                    for i, (text, finish) in enumerate(zip(texts, finish_reasons))],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(id: str, model: str, created: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def models_list(names: Iterable[str]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "bpo-plugins"} for n in names]}


class ChatFromCompletion:
    """A completions answer (a whole body, or its SSE stream) as a chat completion: how the gateway
    answers a chat client whose request went to a base model as one completions call.

    ``clean`` turns the generated text into the answer (DRPO's markers removed) for a whole body;
    a stream drops the leading whitespace after ``<START>`` and relays the rest as it arrives.
    """

    def __init__(self, clean: Callable[[str], str]) -> None:
        self.clean = clean

    def response(self, raw: bytes) -> bytes:
        try:
            body = json.loads(raw)
            choices = [(c.get("text") or "", c.get("finish_reason") or "stop") for c in body["choices"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            return raw  # not a completion: pass it on as it came
        chat = chat_completion(body.get("model", ""), [self.clean(t) for t, _ in choices], 0, 0, [f for _, f in choices])
        chat.update({k: body[k] for k in ("id", "created", "usage") if k in body})
        return json.dumps(chat, ensure_ascii=False).encode()

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        buffer, started = b"", set()
        async for chunk in chunks:
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                yield self._frame(frame, started)
        if buffer.strip():
            yield self._frame(buffer, started)

    def _frame(self, frame: bytes, started: set[int]) -> bytes:
        data = b"".join(line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:"))
        if data == b"[DONE]" or not data:
            return frame + b"\n\n"
        try:
            chunk = json.loads(data)
            choices = chunk["choices"]
        except (ValueError, KeyError, TypeError):
            return frame + b"\n\n"  # an error event or anything else: as it came
        deltas = []
        for choice in choices:
            index, text = choice.get("index", 0), choice.get("text") or ""
            delta: dict[str, Any] = {}
            if index not in started:
                text = text.lstrip()
                if not text and choice.get("finish_reason") is None:
                    continue  # whitespace after <START>: wait for the answer's first word
                started.add(index)
                delta["role"] = "assistant"
            delta["content"] = text
            deltas.append({"index": index, "delta": delta, "finish_reason": choice.get("finish_reason"), "logprobs": None})
        out = {"id": chunk.get("id", ""), "object": "chat.completion.chunk", "created": chunk.get("created", 0),
               "model": chunk.get("model", ""), "choices": deltas}
        if "usage" in chunk:
            out["usage"] = chunk["usage"]
        if not deltas and "usage" not in chunk:
            return b""
        return sse(out)
