"""An optimizer behind any OpenAI-compatible chat endpoint: vLLM or TGI serving THUDM/BPO, or an API LLM."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.decoding import Decoding
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PROMPT_ENGINEER, PromptTemplate, pick_local_template


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ModelLoadError(f"this backend needs the {module!r} package: pip install 'bpo-plugins[{extra}]'") from exc


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 2,
    ) -> None:
        openai = _require("openai", "openai")
        self.model_id = model
        self.revision = base_url or "api.openai.com"
        # A self-hosted BPO checkpoint wants BPO's instruction; an API LLM acts as prompt engineer.
        self.default_template = pick_local_template(model, True) if "bpo" in model.lower() else PROMPT_ENGINEER
        # Local servers (vLLM, llama.cpp) take any key; the client insists on one being set.
        key = api_key or os.environ.get("OPENAI_API_KEY") or ("not-needed" if base_url else None)
        if key is None:
            raise ModelLoadError("no OpenAI API key: pass api_key=... or set OPENAI_API_KEY")
        self.max_concurrency = max_concurrency
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries)
        self._aclient = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=max_retries)

    def _request(self, prompt: str, template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model_id,
            "messages": template.messages(prompt),
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature if decoding.do_sample else 0.0,
            "n": decoding.num_candidates,
        }
        if decoding.do_sample and decoding.top_p < 1.0:
            request["top_p"] = decoding.top_p
        if timeout_s is not None:
            request["timeout"] = timeout_s
        return request

    @staticmethod
    def _generation(response: Any) -> Generation:
        texts = [choice.message.content or "" for choice in response.choices]
        tokens = response.usage.completion_tokens if response.usage else 0
        return Generation(texts=texts, output_tokens=tokens)

    def generate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        def one(prompt: str) -> Generation:
            return self._generation(self._client.chat.completions.create(**self._request(prompt, template, decoding, timeout_s)))

        # An HTTP server batches concurrent requests itself (vLLM's continuous batching).
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts)) or 1) as pool:
            return BatchOutput(generations=list(pool.map(one, prompts)))

    async def agenerate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(prompt: str) -> Generation:
            async with limit:
                request = self._request(prompt, template, decoding, timeout_s)
                return self._generation(await self._aclient.chat.completions.create(**request))

        return BatchOutput(generations=list(await asyncio.gather(*(one(p) for p in prompts))))
