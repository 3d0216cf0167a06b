"""What the HTTP backends share: concurrent requests for a batch, sync on threads and async on a semaphore."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.decoding import Decoding
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

__all__ = ["HTTPBackend", "require"]

def require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ModelLoadError(f"this backend needs the {module!r} package: pip install 'bpo-plugins[{extra}]'") from exc


class HTTPBackend(Backend):
    """A batch is sent as concurrent requests: the server batches them itself (vLLM's continuous batching)."""

    max_concurrency: int = 8
    _aclient: Any
    _new_aclient: Any  # makes the async client: one per event loop that uses the backend

    async def aclose(self) -> None:
        """Close the async client's pooled connections while their event loop still runs (else they
        are closed at garbage collection, on a closed loop, with a traceback); the next call opens new ones."""
        client, self._aclient = self._aclient, self._new_aclient()
        await client.close()

    @abstractmethod
    def requests(self, prompt: str, template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> list[dict[str, Any]]:
        """The request bodies that together produce ``decoding.num_candidates`` texts for one prompt."""

    @abstractmethod
    def send(self, request: dict[str, Any]) -> Any: ...

    @abstractmethod
    async def asend(self, request: dict[str, Any]) -> Any: ...

    @abstractmethod
    def generation(self, responses: Sequence[Any]) -> Generation:
        """One prompt's candidates from its responses."""

    def _jobs(self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> list[tuple[int, dict[str, Any]]]:
        return [(i, request) for i, prompt in enumerate(prompts) for request in self.requests(prompt, template, decoding, timeout_s)]

    def _collect(self, n_prompts: int, jobs: list[tuple[int, dict[str, Any]]], responses: Sequence[Any]) -> BatchOutput:
        grouped: list[list[Any]] = [[] for _ in range(n_prompts)]
        for (index, _), response in zip(jobs, responses):
            grouped[index].append(response)
        return BatchOutput(generations=[self.generation(group) for group in grouped])

    def generate(self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> BatchOutput:
        jobs = self._jobs(prompts, template, decoding, timeout_s)
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)) or 1) as pool:
            responses = list(pool.map(lambda job: self.send(job[1]), jobs))
        return self._collect(len(prompts), jobs, responses)

    async def agenerate(self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> BatchOutput:
        jobs = self._jobs(prompts, template, decoding, timeout_s)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(request: dict[str, Any]) -> Any:
            async with limit:
                return await self.asend(request)

        responses = await asyncio.gather(*(one(request) for _, request in jobs))
        return self._collect(len(prompts), jobs, responses)
