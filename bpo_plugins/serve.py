"""``bpo serve``: a local model behind a minimal OpenAI-compatible ``/v1/chat/completions`` API.

Two uses: one optimizer process shared by many apps (point ``Rewriter.from_openai`` at it),
and an offline stand-in target LLM for the examples (LangChain ``ChatOpenAI``, LlamaIndex
``OpenAILike`` and ``dspy.LM`` all speak this API). For production traffic serve THUDM/BPO
with vLLM instead; this server runs one generation at a time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bpo_plugins.backends.transformers import TransformersBackend
from bpo_plugins.decoding import Decoding


def content_text(content: Any) -> str:
    """OpenAI message content as text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def request_decoding(body: dict[str, Any]) -> Decoding:
    temperature = float(body.get("temperature") if body.get("temperature") is not None else 1.0)
    return Decoding(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=float(body.get("top_p") or 1.0),
        num_candidates=max(1, int(body.get("n") or 1)),
        max_new_tokens=max(1, int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)),
    )


def chat_completion(model: str, texts: list[str], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for i, text in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class ChatHandler(BaseHTTPRequestHandler):
    """Serves ``backend`` (set on a subclass by :func:`make_server`)."""

    backend: TransformersBackend | None = None
    model_name = "local"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is noise for a local helper

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self.send_json(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "bpo"}]})
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        try:
            body = self.read_json()
            self.send_json(200, self.complete(body))
        except (ValueError, KeyError, TypeError) as exc:
            self.send_json(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            raise ValueError(f"no route {self.path}")
        messages = [{"role": m["role"], "content": content_text(m["content"])} for m in body["messages"]]
        assert self.backend is not None
        output = self.backend.chat(messages, request_decoding(body))
        texts = output.generations[0].texts
        return chat_completion(
            str(body.get("model", self.model_name)), texts, int(output.stats["input_tokens"]), int(output.stats["output_tokens"])
        )


def make_server(
    backend: TransformersBackend | None, host: str = "127.0.0.1", port: int = 0, handler: type[ChatHandler] = ChatHandler
) -> ThreadingHTTPServer:
    name = backend.model_id if backend is not None else "local"
    bound = type("BoundChatHandler", (handler,), {"backend": backend, "model_name": name})
    return ThreadingHTTPServer((host, port), bound)


def serve_in_thread(backend: TransformersBackend, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start a server on a daemon thread; return it and its ``/v1`` base URL."""
    server = make_server(backend, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/v1"
