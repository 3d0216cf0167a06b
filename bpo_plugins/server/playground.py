"""The playground page of ``bpo serve``: type a prompt, see what a rewrite did.

``GET /`` is one static HTML file (``bpo_plugins/data/playground.html``: plain JS and CSS, no build
step). Its script calls two JSON endpoints:

- ``POST /playground/rewrite`` ``{"prompt", "mode", "model"}``: the rewrite, its word diff
  (:func:`bpo_plugins.diff.word_diff`), every aggressive candidate, the guards' verdict and reason,
  and the latency;
- ``POST /playground/answer`` ``{"prompt"}``: the ``--target`` model's answer to one prompt, so the
  page can show the answers to the original and to the rewrite side by side.

Keys stay in this process: the page learns the target's model name and host, never its key or URL
path. The page renders every text with ``textContent``, and a Content-Security-Policy lets only the
page's own inline script and style run (their hashes), so text that looks like HTML stays text.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from bpo_plugins.backends.base import Backend
from bpo_plugins.decoding import Decoding
from bpo_plugins.diff import diff_ops_json, word_diff
from bpo_plugins.result import MODES, RewriteResult
from bpo_plugins.server import openai_api as api
from bpo_plugins.server.asgi import Endpoint
from bpo_plugins.server.openai_api import RequestError
from bpo_plugins.spec import ModelSpec
from bpo_plugins.templates import TARGET

__all__ = ["PAGE", "Playground", "verdict"]

#: The page: package data (``bpo_plugins/data/**`` is in the wheel), plain HTML, JS and CSS.
PAGE = Path(__file__).parent.parent / "data" / "playground.html"
#: The target's answers: long enough to compare, short enough to wait for on a CPU.
ANSWER_TOKENS = 256


def verdict(result: RewriteResult) -> str:
    """What the guards decided, in one word: ``rewritten``, ``unchanged`` (the optimizer gave the prompt
    back) or ``fallback`` (a guard refused the rewrite; ``result.fallback`` says which)."""
    if result.fallback is not None:
        return "fallback"
    return "rewritten" if result.changed else "unchanged"


def _content_security_policy(html: str) -> str:
    """Only the page's own inline script and style may run: each allowed by its SHA-256."""

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in found)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _public_name(spec: ModelSpec) -> str:
    """The target as the page may show it: its model name and host, nothing of the URL's user, path or query."""
    if spec.base_url is None:
        return spec.model
    parts = urlsplit(spec.base_url)
    return f"{spec.model} at {parts.hostname}{f':{parts.port}' if parts.port else ''}"


def _masked(exc: Exception) -> str:
    """An exception as one line for the page, with anything shaped like an API key starred out."""
    message = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: " + re.sub(r"\b(sk|key)-[\w-]+", r"\1-***", message)


def _text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, f"'{name}' must be a non-empty string", param=name)
    return value


@dataclass
class _Target:
    spec: ModelSpec
    backend: Backend | None = None


class Playground:
    """The page and its endpoints over the server's own optimizer (``served``) and, on demand, the
    other registry optimizers; ``target`` is the ``--target`` spec, loaded on its first answer."""

    def __init__(self, served: Any, served_name: str, target: ModelSpec | None = None) -> None:
        from bpo_plugins.registry import REGISTRY

        self._rewriters: dict[str, Any] = {served_name: served}
        self.models = [served_name, *(name for name in REGISTRY if name != served_name)]
        self._target = None if target is None else _Target(target)
        self._lock = threading.Lock()
        self._html = PAGE.read_text(encoding="utf-8")
        self._policy = _content_security_policy(self._html)

    # -- endpoints ----------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self._html, headers={"Content-Security-Policy": self._policy, "X-Content-Type-Options": "nosniff",
                                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    async def config(self, request: Request) -> Response:
        target = None if self._target is None else _public_name(self._target.spec)
        return JSONResponse({"models": self.models, "modes": list(MODES), "target": target})

    async def rewrite(self, request: Request) -> Response:
        body = api.parse_json_object(await request.body())
        prompt = _text_field(body, "prompt")
        mode = body.get("mode", "greedy")
        if mode not in MODES:
            raise RequestError(400, f"'mode' must be one of {', '.join(MODES)}", param="mode")
        model = body.get("model", self.models[0])
        if model not in self.models:
            raise RequestError(400, f"'model' must be one of {', '.join(self.models)}", param="model")
        rewriter = await asyncio.to_thread(self._rewriter, model)
        result: RewriteResult = await asyncio.to_thread(rewriter.rewrite, prompt, mode=mode)
        return JSONResponse({
            "original": result.original, "rewritten": result.rewritten, "mode": result.mode, "model": model,
            "backend": result.backend, "diff": diff_ops_json(word_diff(result.original, result.rewritten)),
            "candidates": list(result.candidates), "verdict": verdict(result),
            "reason": None if result.fallback is None else result.fallback.value, "detail": result.detail,
            "latency_s": round(result.latency_s, 3), "cached": result.cached,
        })

    async def answer(self, request: Request) -> Response:
        if self._target is None:
            raise RequestError(404, "this server has no target model: start it with --target MODEL@URL", code="no_target")
        prompt = _text_field(api.parse_json_object(await request.body()), "prompt")
        start = time.perf_counter()
        try:
            backend = await asyncio.to_thread(self._target_backend)
            output = await backend.agenerate([prompt], TARGET, Decoding(max_new_tokens=ANSWER_TOKENS), None)
        except Exception as exc:  # noqa: BLE001 - the page shows why the target did not answer
            raise RequestError(502, f"the target did not answer: {_masked(exc)}", type="upstream_error") from exc
        return JSONResponse({"answer": output.generations[0].texts[0].strip(), "latency_s": round(time.perf_counter() - start, 3)})

    # -- models -------------------------------------------------------------------------------

    def _rewriter(self, name: str) -> Any:
        """The optimizer for ``name``: the served one, or a registry optimizer loaded on its first use."""
        with self._lock:
            if name not in self._rewriters:
                from bpo_plugins import Rewriter

                self._rewriters[name] = Rewriter.from_spec(name).warmup()
            return self._rewriters[name]

    def _target_backend(self) -> Backend:
        from bpo_plugins.backends import load_backend

        assert self._target is not None
        with self._lock:
            if self._target.backend is None:
                self._target.backend = load_backend(self._target.spec)
            return self._target.backend

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/playground/config", self.config, methods=["GET"]),
            Route("/playground/rewrite", Endpoint(self.rewrite), methods=["POST"]),
            Route("/playground/answer", Endpoint(self.answer), methods=["POST"]),
        ]
