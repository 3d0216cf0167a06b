"""``bpo serve``'s app, extended for tests, run as its own process on 127.0.0.1 under uvicorn.

On top of the product's OpenAI-compatible API over a real local model (chat, completions, streaming):
- ``GET /v1/received``: every request (path, body, headers), so tests see what the upstream was sent;
- ``GET /v1/events``: per ``x-test-id`` header, whether that request's stream finished or was closed;
- ``POST /v1/messages``: Anthropic's Messages API shape, over the same model or script;
- model ``script*``: replies from a JSON file ``{"substring": "reply"}`` (first match wins), where a reply
  ``"__sleep__:S:text"`` waits S seconds first, ``"__error__:CODE"`` returns that status and
  ``"__flaky__:N:CODE:text"`` returns CODE (with ``retry-after: 0``) to the first N requests; a list of
  replies gives the n choices of one request in turn (a sampled optimizer's proposals). It stands
  in for OpenAI's and Anthropic's servers, and for judge and optimizer LLMs, which cannot exist here;
- model ``echo*``: a deterministic reply made from the request's last message, streamed in many chunks;
- models named ``*-dspy``: the real model answers the last ``[[ ## field ## ]]`` input of a DSPy
  ChatAdapter prompt, wrapped in DSPy's output format (a 135M model cannot follow it);
- ``/v1/embeddings`` and anything else under ``/v1``: a fixed binary-safe echo, for pass-through tests;
- ``/v1/completions`` for model ``script*``: the scripted replies, matched in the raw prompt (a BPO checkpoint
  on vLLM);
- ``--reject-field NAME`` (repeatable): a request that carries that field gets a 400 naming it, as OpenAI's
  API answers a field it does not know ("Unrecognized request argument supplied: NAME");
- ``--vllm-limits``: a completion request whose ``min_tokens`` exceeds its ``max_tokens`` gets the 400 vLLM
  answers ("min_tokens must be less than or equal to max_tokens=..."); a completions reply
  ``"__error__:400:MESSAGE"`` answers 400 with that message;
- fault switches, per request, in the ``x-test-fault`` header: ``latency=S`` (before the answer),
  ``status=CODE`` (an OpenAI-shaped error with rate-limit headers), ``reset`` (the connection drops
  mid-stream), ``hang`` (no answer at all), ``trickle=S`` (S seconds between chunks).

    python tests/support/openai_server.py [--model-path DIR] [--script FILE] [--reject-field NAME ...]

It prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bpo_plugins.decoding import Decoding
from bpo_plugins.server import openai_api as api
from bpo_plugins.server import serve_announced
from bpo_plugins.server.asgi import BodyLimit, Endpoint
from bpo_plugins.server.local import LocalModelAPI, request_decoding

DSPY_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond|\Z)", re.S)
RATE_HEADERS = {"retry-after": "1", "x-ratelimit-remaining-requests": "0", "x-should-retry": "true"}


def echo_reply(text: str, words: int = 24) -> str:
    """A reply that only this request's text produces: its hash, then numbered words."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"reply-{digest}: " + " ".join(f"w{i}" for i in range(words))


class TestAPI(LocalModelAPI):
    def __init__(self, backend: Any, script: dict[str, str]) -> None:
        super().__init__(backend, "test-model")
        self.script = script
        self.received: list[dict[str, Any]] = []
        self.events: dict[str, str] = {}
        self.flaky: dict[str, int] = {}
        self.count = 0
        self.reject_fields: list[str] = []
        self.vllm_limits = False

    # -- bookkeeping --------------------------------------------------------------------------

    async def record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {"_raw_bytes": len(raw)}
        self.received.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
        self.count += 1
        return body if isinstance(body, dict) else {}

    def fault(self, request: Request) -> dict[str, str]:
        spec = request.headers.get("x-test-fault", "")
        return dict(part.split("=", 1) if "=" in part else (part, "") for part in spec.split(",") if part)

    async def received_endpoint(self, request: Request) -> Response:
        # json.dumps escapes lone surrogates that fuzzed requests carry; JSONResponse would fail on them.
        return Response(json.dumps({"received": self.received}), media_type="application/json")

    async def events_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.events)

    # -- model calls --------------------------------------------------------------------------

    def rejection(self, body: dict[str, Any]) -> Response | None:
        """A 400 naming the first field of ``--reject-field`` the request carries, as OpenAI's API answers."""
        field = next((f for f in self.reject_fields if f in body), None)
        if field is None:
            return None
        return JSONResponse(api.error_body(f"Unrecognized request argument supplied: {field}", param=field), status_code=400)

    async def chat_completions(self, request: Request) -> Response:
        body = await self.record(request)
        if (rejected := self.rejection(body)) is not None:
            return rejected
        faults = self.fault(request)
        test_id = request.headers.get("x-test-id", "")
        try:
            self.events[test_id] = "waiting"
            if "latency" in faults:
                await asyncio.sleep(float(faults["latency"]))
            if "hang" in faults:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:  # the client (the gateway) closed the request before any byte
            self.events[test_id] = "closed"
            raise
        if "status" in faults:
            code = int(faults["status"])
            headers = {**RATE_HEADERS, "x-request-id": "req-fault"}
            return JSONResponse(api.error_body(f"scripted {code}", type="server_error" if code >= 500 else "rate_limit_error"),
                                status_code=code, headers=headers)
        model = str(body.get("model", ""))
        messages = [{"role": m["role"], "content": api.content_text(m.get("content"))} for m in body.get("messages", [])]
        if body.get("system"):
            messages.insert(0, {"role": "system", "content": api.content_text(body["system"])})
        n = int(body.get("n") or 1)
        if model.startswith(("script", "echo")):
            last = messages[-1]["content"] if messages else ""
            replies = [echo_reply(last)] if model.startswith("echo") else self.scripted(last)
            reply = replies[0]
            if reply.startswith("__flaky__:"):
                _, failures, code, reply = reply.split(":", 3)
                self.flaky[reply] = self.flaky.get(reply, 0) + 1
                if self.flaky[reply] <= int(failures):
                    return JSONResponse(api.error_body("scripted flake", type="server_error"), status_code=int(code),
                                        headers={"retry-after": "0"})
            if reply.startswith("__error__:"):
                code = int(reply.split(":")[1])
                return JSONResponse(api.error_body("scripted failure", type="server_error"), status_code=code)
            if reply.startswith("__sleep__:"):
                _, seconds, reply = reply.split(":", 2)
                await asyncio.sleep(float(seconds))
            if body.get("stream"):
                return self.scripted_stream(request, body, reply, faults)
            texts = ([reply, *replies[1:]] * n)[:n]
            completion_tokens = sum(len(t.split()) for t in texts)
        elif model.endswith("-dspy"):
            fields = DSPY_FIELD.findall(messages[-1]["content"])
            question = fields[-1][1].strip() if fields else messages[-1]["content"]
            decoding = Decoding(max_new_tokens=int(body.get("max_tokens") or 32))
            output = await asyncio.to_thread(self._backend().chat, [{"role": "user", "content": question}], decoding)
            answer = output.generations[0].texts[0].strip() or "(no answer)"
            texts, completion_tokens = [f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"] * n, int(output.stats["output_tokens"])
        else:
            if body.get("stream") or request.url.path.endswith("/chat/completions"):
                return await super().chat_completions(request)
            output = await asyncio.to_thread(self._backend().chat, messages, request_decoding(body))
            texts, completion_tokens = output.generations[0].texts, int(output.stats["output_tokens"])
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        if request.url.path.endswith("/messages"):
            return JSONResponse({
                "id": api.new_id("msg"), "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": texts[0]}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            })
        return JSONResponse(api.chat_completion(model, texts, prompt_tokens, completion_tokens),
                            headers={"x-request-id": f"req-{self.count}", "x-ratelimit-remaining-requests": "99"})

    async def completions(self, request: Request) -> Response:
        body = await self.record(request)
        if (rejected := self.rejection(body)) is not None:
            return rejected
        if self.vllm_limits and int(body.get("min_tokens") or 0) > int(body.get("max_tokens") or 16):
            message = f"min_tokens must be less than or equal to max_tokens={body.get('max_tokens')}, got {body['min_tokens']}."
            return JSONResponse(api.error_body(message, type="BadRequestError"), status_code=400)
        model, prompt = str(body.get("model", "")), str(body.get("prompt", ""))
        if model.startswith("script"):
            n = int(body.get("n") or 1)
            texts = (self.scripted(prompt) * n)[:n]
            if texts[0].startswith("__error__:"):
                _, code, *message = texts[0].split(":", 2)
                return JSONResponse(api.error_body(message[0] if message else "scripted failure", type="server_error"),
                                    status_code=int(code))
            return JSONResponse(api.text_completion(model, texts, len(prompt.split()), sum(len(t.split()) for t in texts)))
        return await super().completions(request)

    def scripted(self, last: str) -> list[str]:
        reply = next((r for key, r in self.script.items() if key in last), last)
        return list(reply) if isinstance(reply, list) else [reply]

    def scripted_stream(self, request: Request, body: dict[str, Any], reply: str, faults: dict[str, str]) -> Response:
        test_id = request.headers.get("x-test-id", "")
        model = str(body.get("model"))
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        words = reply.split(" ")

        async def frames() -> Any:
            id, created = api.new_id("chatcmpl"), int(time.time())
            self.events[test_id] = "open"
            try:
                yield api.sse(api.chat_chunk(id, model, created, {"role": "assistant", "content": ""}))
                for i, word in enumerate(words):
                    if "reset" in faults and i == 3:
                        raise ConnectionResetError("scripted reset")  # uvicorn drops the connection
                    if "trickle" in faults:
                        await asyncio.sleep(float(faults["trickle"]))
                    yield api.sse(api.chat_chunk(id, model, created, {"content": word if i == 0 else " " + word}))
                yield api.sse(api.chat_chunk(id, model, created, {}, "stop"))
                if include_usage:
                    yield api.sse(api.chat_chunk(id, model, created, None, usage_=api.usage(3, len(words))))
                yield api.DONE_FRAME
                self.events[test_id] = "finished"
            finally:
                if self.events.get(test_id) == "open":
                    self.events[test_id] = "closed"

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={**api.SSE_HEADERS, "x-request-id": f"req-{test_id}"})

    async def other(self, request: Request) -> Response:
        await self.record(request)
        raw = await request.body()
        payload = b"echo:" + request.method.encode() + b":" + request.url.path.encode() + b":" + raw
        return Response(payload, media_type="application/octet-stream", headers={"x-request-id": "req-other"})

    def routes(self) -> list[Route]:
        return [
            Route("/v1/received", self.received_endpoint, methods=["GET"]),
            Route("/v1/events", self.events_endpoint, methods=["GET"]),
            Route("/v1/messages", Endpoint(self.chat_completions), methods=["POST"]),
            *super().routes(),
            Route("/v1/{rest:path}", self.other, methods=["GET", "POST", "PUT", "DELETE"]),
        ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path")
    parser.add_argument("--script")
    parser.add_argument("--reject-field", action="append", default=[])
    parser.add_argument("--vllm-limits", action="store_true")
    args = parser.parse_args()
    backend = None
    if args.model_path:
        import torch

        from bpo_plugins.backends.transformers import TransformersBackend

        torch.set_num_threads(1)
        backend = TransformersBackend.load(args.model_path)
    script = {}
    if args.script:
        with open(args.script) as f:
            script = json.load(f)
    test_api = TestAPI(backend, script)
    test_api.reject_fields = args.reject_field
    test_api.vllm_limits = args.vllm_limits
    app = BodyLimit(Starlette(routes=test_api.routes()), 64 << 20)
    serve_announced(app, "127.0.0.1", 0, lambda port: print(f"PORT {port}", flush=True))


if __name__ == "__main__":
    main()
