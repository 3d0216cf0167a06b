"""Anthropic's Messages API, as the gateway reads it and answers its own errors in it.

The gateway relays Anthropic's answers byte for byte; only its own errors are written here, in
Anthropic's shape ``{"type": "error", "error": {"type": ..., "message": ...}}`` (and, once a stream
has started, as an in-band ``error`` event), so the ``anthropic`` client and Claude Code raise the
error class they would for Anthropic's own.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from bpo_plugins.server.openai_api import RequestError

#: Anthropic's error type for each status the gateway answers itself.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
               503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def from_request_error(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(error.status, error.message, headers)


def error_event(message: str, status: int = 500) -> bytes:
    """An in-band ``error`` event, for a stream that broke after its first byte."""
    return f"event: error\ndata: {json.dumps(error_body(status, message), separators=(',', ':'))}\n\n".encode()


def check_request(body: dict[str, Any]) -> None:
    """A Messages request, type-checked as far as the gateway reads it (the upstream checks the rest)."""
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError(400, "model: must be a string")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise RequestError(400, "system: must be a string or a list of text blocks")
    if isinstance(system, list):
        for i, block in enumerate(system):
            if not isinstance(block, dict) or not isinstance(block.get("text"), str):
                raise RequestError(400, f"system.{i}: must be a text block")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise RequestError(400, "stream: must be a boolean")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise RequestError(400, f"messages.{i}.role: must be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"messages.{i}.content: must be a string or a list of content blocks")
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise RequestError(400, f"messages.{i}.content.{j}: must be an object with a string 'type'")
            if block["type"] == "text" and not isinstance(block.get("text"), str):
                raise RequestError(400, f"messages.{i}.content.{j}.text: must be a string")
