"""The one request rewriter: find the user's prompt in a request body, rewrite it with BPO within a
budget, fail open, and apply a DRPO alignment. Every edge calls it: the gateway, the LiteLLM
guardrail, :class:`~bpo_plugins.drpo.pipeline.AlignmentPipeline` and the framework adapters.

Request shapes (:class:`Shape`):

- ``chat``: OpenAI chat completions, the last user message of ``messages``;
- ``responses``: OpenAI Responses, ``input`` as a string or the last user item;
- ``completions``: OpenAI completions, a string ``prompt``;
- ``messages``: Anthropic Messages, the last user turn's text (a string or its one text block;
  images, ``tool_result``, ``tool_use`` and thinking blocks and earlier turns stay as they are).

The caller's body is never mutated: the returned body shares every part it did not change.
A DRPO alignment goes where each API keeps instructions: a chat request gets DRPO's system message,
query format and stop strings; an Anthropic request gets it in the top-level ``system`` field. An
alignment for a *base* model (``format.raw``: no chat template) turns a chat request into one
completions request with DRPO's rendered text, as DRPO's ``auto_model.py`` serves base models;
``RequestOutcome.upstream_shape`` then says ``completions``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from bpo_plugins.chat import UserPrompt, last_user_index, last_user_prompt
from bpo_plugins.outcome import RequestOutcome, Shape
from bpo_plugins.result import Mode, RewriteResult

if TYPE_CHECKING:
    from bpo_plugins.drpo.alignment import Alignment
    from bpo_plugins.rewriter import Rewriter

__all__ = ["AsyncRewrite", "IntegrationRewriter", "RequestOutcome", "RequestRewriter", "Shape", "arewrite_requests", "find_prompt",
           "rewrite_requests"]

log = logging.getLogger("bpo_plugins.request_rewriter")

#: An async rewrite of one prompt in a mode: ``Rewriter.arewrite`` or a micro-batcher in front of it.
AsyncRewrite = Callable[[str, Mode], Awaitable[RewriteResult]]


# -- finding the prompt --------------------------------------------------------------------------


def _copy_last_user(body: dict[str, Any], key: str) -> dict[str, Any]:
    """``body`` with the list under ``key`` and its last user item copied, so they can be edited."""
    items = body.get(key)
    body = dict(body)
    if not isinstance(items, list):
        return body
    items = list(items)
    i = last_user_index(items)
    if i is not None:
        item = items[i] = dict(items[i])
        if isinstance(item.get("content"), list):
            item["content"] = [dict(p) if isinstance(p, dict) and isinstance(p.get("text"), str) else p for p in item["content"]]
    body[key] = items
    return body


def find_prompt(body: dict[str, Any], shape: Shape) -> tuple[dict[str, Any], UserPrompt | None, str | None]:
    """A copy of ``body`` that may be edited, the user's prompt in it (or None) and why there is none."""
    shape = Shape(shape)
    if shape in (Shape.CHAT, Shape.MESSAGES):
        body = _copy_last_user(body, "messages")
        messages = body.get("messages")
        if not isinstance(messages, list):
            return body, None, "no_messages"
        prompt, reason = last_user_prompt(messages)
        return body, prompt, reason
    field = "prompt" if shape == Shape.COMPLETIONS else "input"
    body = _copy_last_user(body, field) if shape == Shape.RESPONSES else dict(body)
    value = body.get(field)
    if shape == Shape.RESPONSES and isinstance(value, list):
        prompt, reason = last_user_prompt(value)
        return body, prompt, reason
    if not isinstance(value, str):
        return body, None, f"{field}_not_text"
    return body, UserPrompt(value, lambda text: body.__setitem__(field, text)), None


# -- DRPO alignment ------------------------------------------------------------------------------


def _align(body: dict[str, Any], shape: Shape, alignment: Alignment, query: str | None, outcome: RequestOutcome) -> dict[str, Any]:
    """``body`` with ``alignment`` applied by DRPO's request recipe (:meth:`Alignment.align_request`)."""
    aligned = alignment.align_request(body, shape, query)
    if aligned is None:
        return body
    body, upstream = aligned
    outcome.upstream_shape = upstream if upstream != shape else None
    outcome.aligned = True
    return body


# -- the rewriter --------------------------------------------------------------------------------


class RequestRewriter:
    """Rewrites one request at a time within ``timeout_s``, failing open: whatever goes wrong, the
    original prompt goes on and the :class:`RequestOutcome` says why. For servers and guardrails.

    ``rewrite``: a :class:`~bpo_plugins.Rewriter`, or any :data:`AsyncRewrite` (a micro-batcher);
    None rewrites nothing (alignments still apply).
    """

    def __init__(self, rewrite: Rewriter | AsyncRewrite | None, *, timeout_s: float | None = None) -> None:
        if rewrite is not None and hasattr(rewrite, "arewrite"):
            rewriter = rewrite

            async def call(text: str, mode: Mode) -> RewriteResult:
                return await rewriter.arewrite(text, mode=mode)  # type: ignore[union-attr]

            rewrite = call
        self._rewrite: AsyncRewrite | None = rewrite  # type: ignore[assignment]
        self.timeout_s = timeout_s

    async def arewrite(
        self,
        body: dict[str, Any],
        shape: Shape,
        *,
        mode: Mode = "greedy",
        enabled: bool = True,
        opted_out: bool = False,
        unavailable: str | None = None,
        alignment: Alignment | None = None,
    ) -> tuple[dict[str, Any], RequestOutcome]:
        """The request rewritten (and aligned) and what was done.

        ``enabled=False``: this model's requests are not rewritten; ``opted_out``: the client asked
        for no rewrite; ``unavailable``: why the optimizer cannot rewrite now (``optimizer_loading``).
        """
        shape = Shape(shape)
        body, prompt, reason = find_prompt(body, shape)
        original = prompt.text if prompt is not None else None
        outcome = await self._rewrite_prompt(prompt, reason, mode, enabled, opted_out, unavailable)
        if alignment is not None:
            body = _align(body, shape, alignment, original, outcome)
        return body, outcome

    async def _rewrite_prompt(self, prompt: UserPrompt | None, reason: str | None, mode: Mode, enabled: bool,
                              opted_out: bool, unavailable: str | None) -> RequestOutcome:
        if opted_out:
            return RequestOutcome("off")
        skipped = _not_rewritten(prompt, reason, enabled and self._rewrite is not None)
        if skipped is not None:
            return skipped
        if unavailable is not None:
            return RequestOutcome("fallback", unavailable)
        assert prompt is not None and self._rewrite is not None  # _not_rewritten said so
        start = time.perf_counter()
        try:
            call = self._rewrite(prompt.text, mode)
            result = await (asyncio.wait_for(call, self.timeout_s) if self.timeout_s is not None else call)
        except asyncio.TimeoutError:
            return RequestOutcome("fallback", "timeout", rewrite_s=time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - fail open: the original prompt goes on
            log.warning("rewrite failed (%s); the original prompt goes on", type(exc).__name__)
            return RequestOutcome("fallback", "backend_error", rewrite_s=time.perf_counter() - start)
        return _rewritten(prompt, result, time.perf_counter() - start)


def _not_rewritten(prompt: UserPrompt | None, reason: str | None, rewriting: bool) -> RequestOutcome | None:
    """Why a request goes on without a rewrite (this model's requests are not rewritten, or there is
    no prompt to rewrite); None when its prompt is to be rewritten."""
    if not rewriting:
        return RequestOutcome("skipped", "model_not_rewritten")
    if prompt is None:
        return RequestOutcome("skipped", reason)
    return None


def _rewritten(prompt: UserPrompt, result: RewriteResult, seconds: float) -> RequestOutcome:
    """The outcome of a finished rewrite, its text put in the request when applied."""
    outcome = RequestOutcome.of(result, seconds)
    if outcome.status == "applied":
        prompt.replace(result.rewritten)
    return outcome


# -- batches: one rewrite_batch for many requests ------------------------------------------------

Shapes = Shape | Sequence[Shape]
_Found = tuple[dict[str, Any], UserPrompt | None, str | None, Shape]


def _batch_inputs(bodies: Sequence[dict[str, Any]], shapes: Shapes) -> tuple[list[_Found], list[str]]:
    per_body = [Shape(shapes)] * len(bodies) if isinstance(shapes, (str, Shape)) else [Shape(s) for s in shapes]
    if len(per_body) != len(bodies):
        raise ValueError("give one shape, or one shape per body")
    found = [(*find_prompt(body, shape), shape) for body, shape in zip(bodies, per_body)]
    return found, [prompt.text for _, prompt, _, _ in found if prompt is not None]  # type: ignore[misc]


def _batch_finish(found: list[_Found], results: Sequence[RewriteResult], seconds: float, alignment: Alignment | None,
                  rewriting: bool) -> list[tuple[dict[str, Any], RequestOutcome]]:
    out = []
    pending = iter(results)
    for body, prompt, reason, shape in found:
        original = prompt.text if prompt is not None else None
        outcome = _not_rewritten(prompt, reason, rewriting) or _rewritten(prompt, next(pending), seconds)  # type: ignore[arg-type]
        if alignment is not None:
            body = _align(body, shape, alignment, original, outcome)
        out.append((body, outcome))
    return out


def rewrite_requests(bodies: Sequence[dict[str, Any]], shapes: Shapes, rewriter: Rewriter | None, *, mode: Mode | None = None,
                     strict: bool = False, alignment: Alignment | None = None) -> list[tuple[dict[str, Any], RequestOutcome]]:
    """Many requests (one shape, or one per body) rewritten with one ``rewrite_batch`` call (one
    generate call), then aligned. ``rewriter=None``: alignment only. ``strict``: a fallback raises
    :class:`~bpo_plugins.RewriteError` instead of passing the original on."""
    found, texts = _batch_inputs(bodies, shapes)
    start = time.perf_counter()
    results = rewriter.rewrite_batch(texts, mode=mode, strict=strict) if rewriter is not None and texts else []
    return _batch_finish(found, results, time.perf_counter() - start, alignment, rewriter is not None)


async def arewrite_requests(bodies: Sequence[dict[str, Any]], shapes: Shapes, rewriter: Rewriter | None, *, mode: Mode | None = None,
                            strict: bool = False, alignment: Alignment | None = None) -> list[tuple[dict[str, Any], RequestOutcome]]:
    """:func:`rewrite_requests` off the event loop's thread for local models."""
    found, texts = _batch_inputs(bodies, shapes)
    start = time.perf_counter()
    results = await rewriter.arewrite_batch(texts, mode=mode, strict=strict) if rewriter is not None and texts else []
    return _batch_finish(found, results, time.perf_counter() - start, alignment, rewriter is not None)


# -- what every framework integration holds ------------------------------------------------------


class IntegrationRewriter:
    """The settings each framework integration holds, and its calls into the request rewriter.

    ``rewriter``: the BPO optimizer; None means the process-wide bundled ``bpo-small``
    (:meth:`Rewriter.shared`), loaded on first use. ``bpo=False``: no rewrite (alignment only).
    ``fail_open``: a failed rewrite passes the original on (else :class:`~bpo_plugins.RewriteError`).
    ``alignment``: a DRPO :class:`~bpo_plugins.drpo.Alignment` applied to every request.
    """

    def __init__(self, rewriter: Rewriter | None = None, *, mode: Mode = "greedy", fail_open: bool = True, bpo: bool = True,
                 alignment: Alignment | None = None) -> None:
        self._rewriter = rewriter
        self.mode: Mode = mode
        self.fail_open = fail_open
        self.bpo = bpo
        self.alignment = alignment

    @property
    def rewriter(self) -> Rewriter:
        if self._rewriter is None:
            from bpo_plugins.rewriter import Rewriter

            self._rewriter = Rewriter.shared()
        return self._rewriter

    def rewrite(self, bodies: Sequence[dict[str, Any]], shapes: Shapes) -> list[tuple[dict[str, Any], RequestOutcome]]:
        return rewrite_requests(bodies, shapes, self.rewriter if self.bpo else None, mode=self.mode,
                                strict=not self.fail_open, alignment=self.alignment)

    async def arewrite(self, bodies: Sequence[dict[str, Any]], shapes: Shapes) -> list[tuple[dict[str, Any], RequestOutcome]]:
        return await arewrite_requests(bodies, shapes, self.rewriter if self.bpo else None, mode=self.mode,
                                       strict=not self.fail_open, alignment=self.alignment)

    def rewrite_texts(self, texts: Sequence[str]) -> list[RewriteResult]:
        """Plain texts (a query string, a program's input fields), each rewritten as one prompt."""
        return _results(self.rewrite([{"prompt": t} for t in texts], Shape.COMPLETIONS))

    async def arewrite_texts(self, texts: Sequence[str]) -> list[RewriteResult]:
        return _results(await self.arewrite([{"prompt": t} for t in texts], Shape.COMPLETIONS))


def _results(done: list[tuple[dict[str, Any], RequestOutcome]]) -> list[RewriteResult]:
    results = [outcome.result for _, outcome in done]
    if any(r is None for r in results):
        raise ValueError("rewrite_texts needs BPO on (bpo=True)")
    return results  # type: ignore[return-value]
