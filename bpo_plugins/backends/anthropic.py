"""Claude as the prompt engineer: the LLM-as-optimizer baseline the BPO paper compares against."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bpo_plugins.backends.base import Generation
from bpo_plugins.backends.http import HTTPBackend, require
from bpo_plugins.decoding import Decoding
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PROMPT_ENGINEER, PromptTemplate

__all__ = ["AnthropicBackend"]

class AnthropicBackend(HTTPBackend):
    name = "anthropic"

    def __init__(
        self, model: str, *, api_key: str | None = None, base_url: str | None = None, max_concurrency: int = 8, max_retries: int = 2
    ) -> None:
        anthropic = require("anthropic", "anthropic")
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if key is None:
            raise ModelLoadError("no Anthropic API key: pass api_key=... or set ANTHROPIC_API_KEY")
        self.model_id = model
        self.revision = base_url or "api.anthropic.com"
        self.default_template = PROMPT_ENGINEER
        self.max_concurrency = max_concurrency
        self._client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=max_retries)
        self._new_aclient = lambda: anthropic.AsyncAnthropic(api_key=key, base_url=base_url, max_retries=max_retries)
        self._aclient = self._new_aclient()

    def requests(self, prompt: str, template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> list[dict[str, Any]]:
        # The Messages API of anthropic>=2 takes no sampling parameters and has no n: Claude samples
        # at its own setting, and each aggressive-mode candidate is a request of its own.
        request: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": decoding.max_new_tokens,
            "messages": [{"role": "user", "content": template.user_text(prompt)}],
        }
        if template.system:
            request["system"] = template.system
        # Banned words are not stop strings: a stop there would end the rewrite instead of steering around
        # the word. Claude does not write BPO's markers, and outputs are cut at them (guards.clean_output).
        # The API refuses whitespace stop sequences, so the newline stop is the Rewriter's cut.
        stops = [w for w in decoding.stop if w.strip()]
        if stops:
            request["stop_sequences"] = stops
        if timeout_s is not None:
            request["timeout"] = timeout_s
        return [request] * decoding.num_candidates

    def send(self, request: dict[str, Any]) -> Any:
        return self._client.messages.create(**request)

    async def asend(self, request: dict[str, Any]) -> Any:
        return await self._aclient.messages.create(**request)

    def generation(self, responses: Sequence[Any]) -> Generation:
        texts = ["".join(block.text for block in r.content if getattr(block, "type", "") == "text") for r in responses]
        return Generation(texts=texts, output_tokens=sum(r.usage.output_tokens for r in responses if r.usage),
                          input_tokens=sum(r.usage.input_tokens for r in responses if r.usage))
