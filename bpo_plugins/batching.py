"""Micro-batching: concurrent async rewrites gathered for a few milliseconds into one batched call.

A server (the gateway, ``bpo serve``) gets rewrites one request at a time. Where the backend
runs a batch faster than the same prompts one by one (``Backend.batch_speedup``, measured per
runtime), waiting a few milliseconds for company pays; where it does not (ONNX Runtime GenAI on a
CPU, HTTP servers that batch concurrent requests themselves), every call goes straight through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

#: A backend must gain at least this much from batching before callers wait to gather prompts.
MIN_BATCH_SPEEDUP = 1.2


def gains_from_batching(rewriter: Rewriter) -> bool:
    return rewriter.backend.batch_speedup >= MIN_BATCH_SPEEDUP


def file_batch_size(rewriter: Rewriter) -> int:
    """Prompts per call for bulk rewriting: an HTTP server's concurrency (it batches them itself); a
    local runtime's batch only where batching measured faster than one prompt at a time."""
    from bpo_plugins.backends.http import HTTPBackend

    if isinstance(rewriter.backend, HTTPBackend):
        return rewriter.backend.max_concurrency
    return 8 if gains_from_batching(rewriter) else 1


@dataclass
class _Pending:
    prompts: list[str] = field(default_factory=list)
    contexts: list[str | None] = field(default_factory=list)
    futures: list[asyncio.Future[RewriteResult]] = field(default_factory=list)


class MicroBatcher:
    """``await batcher.rewrite(prompt)``: the same result as ``rewriter.arewrite``, batched where that pays.

    ``enabled=None`` decides from the loaded backend's measured ``batch_speedup``; ``True`` or
    ``False`` forces it. Calls with different modes never share a batch. A caller that is
    cancelled while its batch runs only drops its own result.
    """

    def __init__(self, rewriter: Rewriter, *, window_ms: float = 5.0, max_batch: int = 8, enabled: bool | None = None) -> None:
        if window_ms < 0 or max_batch < 1:
            raise ValueError("window_ms must be >= 0 and max_batch >= 1")
        self.rewriter = rewriter
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self._enabled = enabled
        self._pending: dict[Mode | None, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batched calls made, for metrics and tests

    @property
    def enabled(self) -> bool:
        if self._enabled is None:
            self._enabled = gains_from_batching(self.rewriter)
        return self._enabled

    async def rewrite(self, prompt: str, *, context: str | None = None, mode: Mode | None = None) -> RewriteResult:
        if not self.rewriter.loaded:
            await asyncio.to_thread(self.rewriter.warmup)
        if not self.enabled:
            return await self.rewriter.arewrite(prompt, context=context, mode=mode)
        future: asyncio.Future[RewriteResult] = asyncio.get_running_loop().create_future()
        pending = self._pending.get(mode)
        if pending is None:
            pending = self._pending[mode] = _Pending()
            task = asyncio.create_task(self._flush_after_window(mode))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        pending.prompts.append(prompt)
        pending.contexts.append(context)
        pending.futures.append(future)
        if len(pending.prompts) >= self.max_batch:
            self._start(mode)
        return await future

    async def _flush_after_window(self, mode: Mode | None) -> None:
        await asyncio.sleep(self.window_s)
        self._start(mode)

    def _start(self, mode: Mode | None) -> None:
        pending = self._pending.pop(mode, None)
        if pending is None:
            return
        task = asyncio.create_task(self._run(pending, mode))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, pending: _Pending, mode: Mode | None) -> None:
        live = [i for i, f in enumerate(pending.futures) if not f.done()]  # callers cancelled while waiting
        if not live:
            return
        self.batches += 1
        try:
            results = await self.rewriter.arewrite_batch(
                [pending.prompts[i] for i in live], contexts=[pending.contexts[i] for i in live], mode=mode
            )
        except asyncio.CancelledError:
            for i in live:
                pending.futures[i].cancel()
            raise
        except Exception as exc:  # strict rewriters raise; hand each caller the error
            for i in live:
                if not pending.futures[i].done():
                    pending.futures[i].set_exception(exc)
            return
        for i, result in zip(live, results):
            if not pending.futures[i].done():
                pending.futures[i].set_result(result)
