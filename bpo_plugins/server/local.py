"""``bpo serve``: a local model behind an OpenAI-compatible API, streaming included, on any local runtime.

Two uses: one optimizer process shared by many apps (``Rewriter.from_openai`` against
``/v1/completions`` with BPO's raw template, or ``/v1/chat/completions``), and an offline stand-in
target LLM (LangChain ``ChatOpenAI``, LlamaIndex ``OpenAILike``, ``dspy.LM`` and the gateway all speak
this API). Generations run one at a time per model on worker threads, so the event loop keeps
serving health checks and streams; a client that hangs up stops its generation at the next token.
For heavy traffic serve the model with vLLM or SGLang instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bpo_plugins.backends.local import LocalBackend, TokenStream
from bpo_plugins.decoding import Decoding, cut_at_stop
from bpo_plugins.server import openai_api as api
from bpo_plugins.server.asgi import BodyLimit, Endpoint
from bpo_plugins.server.openai_api import RequestError


def request_decoding(body: dict[str, Any]) -> Decoding:
    temperature = api.number(body, "temperature", 1.0, low=0, high=2)
    n = api.number(body, "n", 1, low=1, high=16)
    max_tokens = api.number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 256, low=1, high=8192)
    return Decoding(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=api.number(body, "top_p", 1.0, low=0, high=1) or 1.0,
        num_candidates=int(n),
        max_new_tokens=int(max_tokens),
    )


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    return stops


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    cut = cut_at_stop(text, stops)
    return cut, len(cut) < len(text)


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of a stream could still be the start of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


def finish_reason(tokens: int, decoding: Decoding) -> str:
    """OpenAI's ``finish_reason``: ``length`` when the token budget ran out, else ``stop``."""
    return "length" if tokens >= decoding.max_new_tokens else "stop"


class LocalModelAPI:
    """The OpenAI-compatible endpoints over one loaded local backend."""

    def __init__(self, backend: LocalBackend | None, model_name: str | None = None) -> None:
        self.backend = backend
        self.model_name = model_name or (backend.model_id if backend is not None else "local")

    # -- endpoints ----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse(api.models_list([self.model_name]))

    async def chat_completions(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        messages = [{"role": m["role"], "content": api.content_text(m.get("content"))} for m in api.check_messages(body.get("messages"))]
        backend = self._backend()
        return await self.generate(request, body, backend.render_chat(messages), add_special_tokens=False, chat=True)

    async def completions(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # OpenAI's batch form with one prompt, as LangChain and LlamaIndex send it
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string (or a list of one)", param="prompt")
        # As vLLM does: the prompt is raw text and the tokenizer adds its BOS (BPO's [INST] format needs it).
        return await self.generate(request, body, prompt, add_special_tokens=True, chat=False)

    # -- generation ---------------------------------------------------------------------------

    def _backend(self) -> LocalBackend:
        if self.backend is None:
            raise RequestError(404, "this server has no local model loaded", code="model_not_found")
        return self.backend

    async def generate(self, request: Request, body: dict[str, Any], text: str, *, add_special_tokens: bool, chat: bool) -> Response:
        backend = self._backend()
        stops = stop_strings(body)
        decoding = replace(request_decoding(body), stop=tuple(stops))  # the backend stops there, not at max_tokens
        model = str(body.get("model") or self.model_name)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be a boolean", param="stream")
        if stream:
            if decoding.num_candidates > 1:
                raise RequestError(400, "streaming supports n=1 only", param="n")
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            cancel = threading.Event()
            tokens = backend.stream(text, decoding, cancel, add_special_tokens)
            pieces = self.stream_pieces(tokens, stops, cancel)
            frames = self.chat_frames(pieces, tokens, decoding, model, include_usage) if chat else self.completion_frames(pieces, tokens, decoding, model)
            return StreamingResponse(frames, media_type="text/event-stream", headers=api.SSE_HEADERS)
        output = await asyncio.to_thread(backend.generate_texts, [text], decoding, None, add_special_tokens)
        cuts = [split_at_stop(t, stops) for t in output.generations[0].texts]
        prompt_tokens, completion_tokens = int(output.stats["input_tokens"]), int(output.stats["output_tokens"])
        per_candidate = completion_tokens // decoding.num_candidates  # backends count tokens per prompt: for n > 1, the mean
        finishes = ["stop" if found else finish_reason(per_candidate, decoding) for _, found in cuts]
        make = api.chat_completion if chat else api.text_completion
        return JSONResponse(make(model, [text for text, _ in cuts], prompt_tokens, completion_tokens, finishes))

    async def stream_pieces(self, tokens: TokenStream, stops: list[str], cancel: threading.Event) -> AsyncIterator[str]:
        """Text pieces as the model makes them, cut at a stop string (held back while one may be starting)."""
        pieces: Iterator[str] = iter(tokens)
        sentinel = object()
        pending, stopped = "", False
        try:
            while not stopped:
                piece = await asyncio.to_thread(next, pieces, sentinel)
                if piece is sentinel:
                    break
                pending, stopped = split_at_stop(pending + str(piece), stops)
                keep = 0 if stopped else held_back(pending, stops)
                out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if out:
                    yield out
            if pending and not stopped:
                yield pending
        finally:
            cancel.set()  # a stop string, a disconnect or an error: free the model at the next token

    async def chat_frames(self, pieces: AsyncIterator[str], tokens: TokenStream, decoding: Decoding, model: str,
                          include_usage: bool) -> AsyncIterator[bytes]:
        id, created = api.new_id("chatcmpl"), int(time.time())
        yield api.sse(api.chat_chunk(id, model, created, {"role": "assistant", "content": ""}))
        async for piece in pieces:
            yield api.sse(api.chat_chunk(id, model, created, {"content": piece}))
        yield api.sse(api.chat_chunk(id, model, created, {}, finish_reason(tokens.tokens, decoding)))
        if include_usage:
            yield api.sse(api.chat_chunk(id, model, created, None, usage_=api.usage(tokens.prompt_tokens, tokens.tokens)))
        yield api.DONE_FRAME

    async def completion_frames(self, pieces: AsyncIterator[str], tokens: TokenStream, decoding: Decoding,
                                model: str) -> AsyncIterator[bytes]:
        id, created = api.new_id("cmpl"), int(time.time())
        async for piece in pieces:
            yield api.sse(api.completion_chunk(id, model, created, piece))
        yield api.sse(api.completion_chunk(id, model, created, "", finish_reason(tokens.tokens, decoding)))
        yield api.DONE_FRAME

    # -- app ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", Endpoint(self.models), methods=["GET"]),
            Route("/v1/chat/completions", Endpoint(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", Endpoint(self.completions), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.health, methods=["GET"]),
        ]


def build_app(backend: LocalBackend | None, *, model_name: str | None = None, max_body_bytes: int = 4 << 20,
              extra_routes: list[Route] | None = None) -> Any:
    """The ASGI app of ``bpo serve`` (run it with uvicorn); ``extra_routes``: the playground page's."""
    routes = LocalModelAPI(backend, model_name).routes() + (extra_routes or [])
    return BodyLimit(Starlette(routes=routes), max_body_bytes)
