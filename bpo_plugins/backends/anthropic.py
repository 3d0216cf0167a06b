"""Claude as the prompt engineer: the LLM-as-optimizer baseline the BPO paper compares against."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.backends.openai import _require
from bpo_plugins.decoding import Decoding
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PROMPT_ENGINEER, PromptTemplate


class AnthropicBackend(Backend):
    name = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 2,
    ) -> None:
        anthropic = _require("anthropic", "anthropic")
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if key is None:
            raise ModelLoadError("no Anthropic API key: pass api_key=... or set ANTHROPIC_API_KEY")
        self.model_id = model
        self.revision = base_url or "api.anthropic.com"
        self.default_template = PROMPT_ENGINEER
        self.max_concurrency = max_concurrency
        self._client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries)
        self._aclient = anthropic.AsyncAnthropic(api_key=key, base_url=base_url, max_retries=max_retries)

    def _request(self, prompt: str, template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": decoding.max_new_tokens,
            "messages": [{"role": "user", "content": template.user_text(prompt)}],
        }
        # The Messages API of anthropic>=2 takes no sampling parameters: Claude samples at its own
        # setting, so aggressive mode's diversity comes from separate requests.
        if template.system:
            request["system"] = template.system
        if decoding.banned_words:
            request["stop_sequences"] = [w for w in decoding.banned_words if w.strip()]
        if timeout_s is not None:
            request["timeout"] = timeout_s
        return request

    @staticmethod
    def _generation(responses: Sequence[Any]) -> Generation:
        texts = ["".join(block.text for block in r.content if getattr(block, "type", "") == "text") for r in responses]
        return Generation(texts=texts, output_tokens=sum(r.usage.output_tokens for r in responses if r.usage))

    def generate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        # The Messages API has no n: each candidate is its own request.
        jobs = [(i, self._request(p, template, decoding, timeout_s)) for i, p in enumerate(prompts) for _ in range(decoding.num_candidates)]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)) or 1) as pool:
            responses = list(pool.map(lambda job: self._client.messages.create(**job[1]), jobs))
        return self._collect(prompts, jobs, responses)

    async def agenerate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        limit = asyncio.Semaphore(self.max_concurrency)
        jobs = [(i, self._request(p, template, decoding, timeout_s)) for i, p in enumerate(prompts) for _ in range(decoding.num_candidates)]

        async def one(request: dict[str, Any]) -> Any:
            async with limit:
                return await self._aclient.messages.create(**request)

        responses = list(await asyncio.gather(*(one(job[1]) for job in jobs)))
        return self._collect(prompts, jobs, responses)

    def _collect(self, prompts: Sequence[str], jobs: list[tuple[int, dict[str, Any]]], responses: list[Any]) -> BatchOutput:
        grouped: list[list[Any]] = [[] for _ in prompts]
        for (index, _), response in zip(jobs, responses):
            grouped[index].append(response)
        return BatchOutput(generations=[self._generation(group) for group in grouped])
