"""The one rewriting abstraction: modes, guards, cache and batching over any backend."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo_plugins import telemetry as _telemetry
from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.cache import RewriteCache, make_cache, rewrite_key
from bpo_plugins.cleanup import clean_output
from bpo_plugins.construction import RewriterConstructors
from bpo_plugins.decoding import Decoding, check_mode, cut_at_newline, decoding_for
from bpo_plugins.guards import GuardConfig, word_count
from bpo_plugins.judging import checked_inputs, judge_candidates, pass_through_reason
from bpo_plugins.masking import Masked, mask_protected
from bpo_plugins.result import FallbackReason, GuardPreset, Mode, RewriteError, RewriteResult
from bpo_plugins.selectors import SELECTORS, Selector
from bpo_plugins.templates import PROMPT_ENGINEER, PromptTemplate, follows_bpo, resolve_template

__all__ = ["BackendFactory", "Rewriter"]

BackendFactory = Callable[[], Backend]


@dataclass
class _Item:
    """One prompt on its way through a batch."""

    original: str
    context: str | None
    masked: Masked
    key: str | None = None
    result: RewriteResult | None = None


class Rewriter(RewriterConstructors):
    """Rewrites prompts with a prompt-preference optimizer, and never passes on a bad rewrite.

    Every result is safe to send on: when a guard trips (timeout, backend error, empty or
    looping output, a length ratio outside BPO's data filter, an answer instead of a
    rewrite, a lost protected span) the original prompt goes through and ``fallback`` says
    why. With ``strict=True`` a :class:`RewriteError` is raised instead. With ``stop_loops`` (the
    default) local backends stop a candidate as soon as it starts repeating itself and keep one copy.
    """

    def __init__(
        self,
        backend: Backend | BackendFactory,
        *,
        template: str | PromptTemplate | None = None,
        mode: Mode = "greedy",
        strict: bool = False,
        timeout_s: float | None = None,
        max_new_tokens: int = 256,
        max_input_words: int = 512,
        num_candidates: int = 5,
        selector: str | Selector = "consensus",
        guards: GuardConfig | None = None,
        cache_size: int = 1024,
        cache_path: str | Path | None = None,
        cache_url: str | None = None,
        stop_loops: bool = True,
        length_budget: bool = True,
    ) -> None:
        self._backend: Backend | None = backend if isinstance(backend, Backend) else None
        self._factory: BackendFactory | None = None if isinstance(backend, Backend) else backend
        self._load_lock = threading.Lock()
        if isinstance(template, str):
            resolve_template(template, PROMPT_ENGINEER)  # a bad template fails here, not at the first rewrite
        self._template_arg = template
        self.mode = check_mode(mode)
        self.strict = strict
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        if max_new_tokens < 1 or max_input_words < 1:
            raise ValueError("max_new_tokens and max_input_words must be >= 1")
        self.max_new_tokens = max_new_tokens
        self.max_input_words = max_input_words
        self.num_candidates = num_candidates
        if isinstance(selector, str):
            if selector not in SELECTORS:
                raise ValueError(f"unknown selector {selector!r}: use one of {sorted(SELECTORS)} or a callable")
            selector = SELECTORS[selector]
        self.selector: Selector = selector
        self.guards = guards or GuardConfig()
        self.cache: RewriteCache = make_cache(cache_size, cache_path, cache_url)  # cache_url: Redis, shared by every host
        self.stop_loops = stop_loops
        #: Our guard: decode at most ~9 tokens per prompt word + 16 (within max_new_tokens). False:
        #: every rewrite may use max_new_tokens, as the reference's fixed max_new_tokens=1024 does.
        self.length_budget = length_budget

    @property
    def backend(self) -> Backend:
        """The backend, loaded on first access (thread-safe)."""
        if self._backend is None:
            with self._load_lock:
                if self._backend is None:
                    assert self._factory is not None
                    self._backend = self._factory()
        return self._backend

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    @property
    def template(self) -> PromptTemplate:
        return resolve_template(self._template_arg, self.backend.default_template)

    # -- public API ---------------------------------------------------------------------------

    def rewrite(
        self,
        prompt: str,
        *,
        context: str | None = None,
        mode: Mode | None = None,
        protect: Sequence[str] = (),
        strict: bool | None = None,
    ) -> RewriteResult:
        """Rewrite one prompt. ``context`` (a passage, a document) is passed through verbatim."""
        return self.rewrite_batch([prompt], contexts=None if context is None else [context], mode=mode, protect=protect, strict=strict)[0]

    def rewrite_batch(
        self,
        prompts: Sequence[str],
        *,
        contexts: Sequence[str | None] | None = None,
        mode: Mode | None = None,
        protect: Sequence[str] = (),
        strict: bool | None = None,
    ) -> list[RewriteResult]:
        """Rewrite many prompts with one padded generate call (cache hits and pass-throughs skip it)."""
        start = time.perf_counter()
        items, mode, decoding = self._prepare(prompts, contexts, mode, protect)
        pending = [item for item in items if item.result is None]
        if pending:
            texts = [item.masked.text for item in pending]
            output = self._run(lambda: self.backend.generate(texts, self.template, decoding, self.timeout_s))
            self._finish(pending, output, mode, decoding)
        return self._results(items, start, strict)

    def plan(self, prompt: str, *, mode: Mode | None = None) -> tuple[str | None, Decoding]:
        """What an engine outside this process (vLLM in a Ray Data pipeline) must generate for ``prompt``:
        the text to put in the template and the decoding. The text is None where no generation is
        needed (empty, too long, or a rewrite already cached); :meth:`check` then answers alone."""
        items, _, decoding = self._prepare([prompt], None, mode, ())
        return (items[0].masked.text if items[0].result is None else None), decoding

    def check(self, prompts: Sequence[str], outputs: Sequence[Sequence[str]], *, mode: Mode | None = None) -> list[RewriteResult]:
        """Results for rewrites generated elsewhere, one list of candidate texts per prompt: the same
        input checks, output cleaning, guards, fallbacks and cache as :meth:`rewrite_batch`."""
        if len(outputs) != len(prompts):
            raise ValueError("check takes one list of generated texts per prompt")
        start = time.perf_counter()
        items, mode, decoding = self._prepare(prompts, None, mode, ())
        pending = [(item, texts) for item, texts in zip(items, outputs) if item.result is None]
        if pending:
            generations = [Generation(texts=list(texts) or [""]) for _, texts in pending]
            self._finish([item for item, _ in pending], BatchOutput(generations=generations), mode, decoding)
        return self._results(items, start, None)

    async def arewrite(
        self,
        prompt: str,
        *,
        context: str | None = None,
        mode: Mode | None = None,
        protect: Sequence[str] = (),
        strict: bool | None = None,
    ) -> RewriteResult:
        results = await self.arewrite_batch(
            [prompt], contexts=None if context is None else [context], mode=mode, protect=protect, strict=strict
        )
        return results[0]

    async def arewrite_batch(
        self,
        prompts: Sequence[str],
        *,
        contexts: Sequence[str | None] | None = None,
        mode: Mode | None = None,
        protect: Sequence[str] = (),
        strict: bool | None = None,
    ) -> list[RewriteResult]:
        start = time.perf_counter()
        if not self.loaded:
            await asyncio.to_thread(self.warmup)  # never load weights on the event loop
        items, mode, decoding = await self._aprepare(prompts, contexts, mode, protect)
        pending = [item for item in items if item.result is None]
        if pending:
            coroutine = self.backend.agenerate([i.masked.text for i in pending], self.template, decoding, self.timeout_s)
            try:
                if self.timeout_s is not None:
                    # Local backends stop themselves at max_time; this bounds HTTP backends too.
                    coroutine = asyncio.wait_for(coroutine, self.timeout_s * 1.5 + 1)
                output: BatchOutput | BaseException = await coroutine
            except asyncio.TimeoutError:
                output = TimeoutError(f"no answer within {self.timeout_s}s")
            except Exception as exc:  # noqa: BLE001 - fail open: any backend failure becomes a fallback
                output = exc
            self._finish(pending, output, mode, decoding)
        return self._results(items, start, strict)

    def with_options(self, **options: Any) -> Rewriter:
        """A Rewriter with other settings (template, mode, limits...) over the same loaded model and cache."""
        settings: dict[str, Any] = {
            "template": self._template_arg, "mode": self.mode, "strict": self.strict, "timeout_s": self.timeout_s,
            "max_new_tokens": self.max_new_tokens, "max_input_words": self.max_input_words,
            "num_candidates": self.num_candidates, "selector": self.selector, "guards": self.guards,
            "stop_loops": self.stop_loops, "length_budget": self.length_budget,
        }
        settings.update(options)
        clone = Rewriter(lambda: self.backend, **settings)
        clone.cache = self.cache  # keys carry the template and decoding, so sharing is safe
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> Rewriter:
        # A Rewriter is a handle on a loaded model (up to 7B weights): frameworks that deep-copy
        # programs (DSPy optimizers, LangChain configurables) must share it, not duplicate it.
        return self

    def __copy__(self) -> Rewriter:
        return self

    def warmup(self) -> Rewriter:
        """Load the backend now instead of on the first rewrite."""
        _ = self.backend
        return self

    # -- pipeline -----------------------------------------------------------------------------

    def _prepare(
        self,
        prompts: Sequence[str],
        contexts: Sequence[str | None] | None,
        mode: Mode | None,
        protect: Sequence[str],
    ) -> tuple[list[_Item], Mode, Decoding]:
        """Check the inputs, mask protected spans, settle what needs no generation (pass-throughs and
        cache hits), and cap the decoding's token budget for the rest."""
        items, mode, decoding = self._admitted(prompts, contexts, mode, protect)
        for item in items:
            if item.key is not None:
                self._settle_cached(item, mode, self.cache.get(item.key))
        return items, mode, decoding.capped(self._token_budget(items))

    async def _aprepare(
        self,
        prompts: Sequence[str],
        contexts: Sequence[str | None] | None,
        mode: Mode | None,
        protect: Sequence[str],
    ) -> tuple[list[_Item], Mode, Decoding]:
        """:meth:`_prepare` for the event loop: a shared cache (Redis) is read without blocking it."""
        items, mode, decoding = self._admitted(prompts, contexts, mode, protect)
        keyed = [item for item in items if item.key is not None]
        for item, record in zip(keyed, await asyncio.gather(*(self.cache.aget(item.key) for item in keyed))):  # type: ignore[arg-type]
            self._settle_cached(item, mode, record)
        return items, mode, decoding.capped(self._token_budget(items))

    def _admitted(
        self, prompts: Sequence[str], contexts: Sequence[str | None] | None, mode: Mode | None, protect: Sequence[str]
    ) -> tuple[list[_Item], Mode, Decoding]:
        prompts, contexts = checked_inputs(prompts, contexts, protect)
        mode = check_mode(mode or self.mode)
        decoding = self._decoding(mode)
        items = [
            self._admit(_Item(prompt, None if contexts is None else contexts[i], mask_protected(prompt, protect)), mode, decoding)
            for i, prompt in enumerate(prompts)
        ]
        return items, mode, decoding

    def _decoding(self, mode: Mode) -> Decoding:
        """BPO's decoding for ``mode``; aggressive mode's newline stop and minimum length only for an
        optimizer trained on BPO's data (:func:`~bpo_plugins.templates.follows_bpo`)."""
        return decoding_for(mode, max_new_tokens=self.max_new_tokens, num_candidates=self.num_candidates,
                            stop_loops=self.stop_loops, bpo_recipe=mode == "aggressive" and follows_bpo(self.template))

    def _admit(self, item: _Item, mode: Mode, decoding: Decoding) -> _Item:
        """Settle ``item`` now when it is a pass-through; in greedy mode, give it its cache key."""
        passed = pass_through_reason(item.masked, self.max_input_words, self._english_only())
        if passed is not None:
            item.result = self._fallback(item, mode, *passed)
        elif mode == "greedy":
            item.key = rewrite_key(self.backend, self.template, decoding, self.guards, item.masked)
        return item

    def _settle_cached(self, item: _Item, mode: Mode, record: dict[str, Any] | None) -> None:
        if record is not None:
            item.result = self._result(item, mode, **RewriteResult.from_record(record))

    def _english_only(self) -> bool:
        """GuardConfig.english_only, where None means: on for optimizers trained on BPO's English data."""
        on = self.guards.english_only
        return follows_bpo(self.template) if on is None else on

    def _token_budget(self, items: list[_Item]) -> int:
        """A rewrite is rarely more than max_length_ratio times the prompt: stop decoding there
        (``length_budget=False``: no budget but max_new_tokens)."""
        if not self.length_budget:
            return self.max_new_tokens
        longest = max((word_count(i.masked.text) for i in items if i.result is None), default=0)
        return int(longest * self.guards.max_length_ratio * 1.5) + 16  # ~1.3-1.5 tokens a word

    def _run(self, call: Callable[[], BatchOutput]) -> BatchOutput | BaseException:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - fail open: any backend failure becomes a fallback
            return exc

    def _finish(self, pending: list[_Item], output: BatchOutput | BaseException, mode: Mode, decoding: Decoding) -> None:
        if isinstance(output, BaseException):
            reason = FallbackReason.TIMEOUT if isinstance(output, TimeoutError) else FallbackReason.BACKEND_ERROR
            for item in pending:
                item.result = self._fallback(item, mode, reason, f"{type(output).__name__}: {output}")
            return
        for item, generation in zip(pending, output.generations):
            try:
                texts = [cut_at_newline(t) for t in generation.texts] if decoding.stop_at_newline else generation.texts
                item.result = self._judge(item, texts, mode, output.timed_out, generation.output_tokens)
                if generation.loops_cut:
                    item.result = item.result.with_(loops_cut=generation.loops_cut)
            except Exception as exc:  # noqa: BLE001 - a guard bug must not break the caller's request
                item.result = self._fallback(item, mode, FallbackReason.BACKEND_ERROR, f"{type(exc).__name__}: {exc}")
            # Timeouts and backend errors may not repeat; everything else is deterministic in greedy mode.
            if item.key is not None and (item.result.fallback is None or not item.result.fallback.transient):
                self.cache.put(item.key, item.result.to_record())

    def _judge(self, item: _Item, texts: list[str], mode: Mode, timed_out: bool, tokens: int) -> RewriteResult:
        if timed_out:
            candidates = [clean_output(t) for t in texts]
            return self._fallback(item, mode, FallbackReason.TIMEOUT, f"generation hit timeout_s={self.timeout_s}", candidates, tokens)
        verdict = judge_candidates(item.masked, texts, self.guards, self.selector)
        if verdict.chosen is None:
            assert verdict.failure is not None
            return self._fallback(item, mode, *verdict.failure, verdict.candidates, tokens)
        return self._result(item, mode, verdict.chosen, candidates=verdict.candidates, output_tokens=tokens)

    def _results(self, items: list[_Item], start: float, strict: bool | None) -> list[RewriteResult]:
        latency = time.perf_counter() - start
        results = [item.result.with_(latency_s=latency) for item in items if item.result is not None]
        _telemetry.record_rewrites(results, start)  # a span per rewrite when the app set a tracer provider
        if self.strict if strict is None else strict:
            for result in results:
                if result.fallback is not None:
                    raise RewriteError(result.fallback, result.detail, result)
        return results

    # -- results and cache records ------------------------------------------------------------

    @property
    def guard_preset(self) -> GuardPreset:
        """Which guards judge this Rewriter's results; the bundled models get ``strict`` unless told otherwise."""
        return self.guards.preset

    def _result(self, item: _Item, mode: Mode, rewritten: str, **fields: Any) -> RewriteResult:
        backend = self._backend
        return RewriteResult(
            original=item.original,
            rewritten=rewritten,
            mode=mode,
            backend=backend.name if backend is not None else "unloaded",
            model=backend.model_id if backend is not None else "",
            context=item.context,
            guard_preset=self.guard_preset,
            **fields,
        )

    def _fallback(
        self,
        item: _Item,
        mode: Mode,
        reason: FallbackReason,
        detail: str,
        candidates: Sequence[str] = (),
        output_tokens: int = 0,
    ) -> RewriteResult:
        return self._result(
            item, mode, item.masked.plain, fallback=reason, detail=detail, candidates=tuple(candidates), output_tokens=output_tokens
        )

    def __repr__(self) -> str:
        backend = self._backend.describe() if self._backend is not None else "not loaded"
        return f"Rewriter(mode={self.mode!r}, strict={self.strict}, backend={backend})"
