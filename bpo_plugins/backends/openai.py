"""An optimizer behind any OpenAI-compatible chat endpoint: vLLM or TGI serving THUDM/BPO, or an API LLM."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bpo_plugins.backends.base import Generation
from bpo_plugins.backends.http import HTTPBackend, require
from bpo_plugins.decoding import Decoding
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PROMPT_ENGINEER, PromptTemplate, pick_local_template


class OpenAIBackend(HTTPBackend):
    name = "openai"

    def __init__(
        self, model: str, *, base_url: str | None = None, api_key: str | None = None, max_concurrency: int = 8, max_retries: int = 2
    ) -> None:
        openai = require("openai", "openai")
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
        self._new_aclient = lambda: openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=max_retries)
        self._aclient = self._new_aclient()

    def requests(self, prompt: str, template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature if decoding.do_sample else 0.0,
            "n": decoding.num_candidates,  # one request: vLLM shares the prompt's prefill across samples
        }
        if decoding.do_sample and decoding.top_p < 1.0:
            request["top_p"] = decoding.top_p
        if template.raw is not None:
            # A BPO checkpoint on vLLM or SGLang: BPO's exact [INST] format through /v1/completions, as it
            # was trained (the server adds BOS); a chat endpoint would wrap it in another template.
            request["prompt"] = template.render_raw(prompt)
        else:
            request["messages"] = template.messages(prompt)
        if decoding.stop:
            request["stop"] = list(decoding.stop)[:4]  # OpenAI takes at most 4
        if timeout_s is not None:
            request["timeout"] = timeout_s
        return [request]

    def send(self, request: dict[str, Any]) -> Any:
        endpoint = self._client.completions if "prompt" in request else self._client.chat.completions
        return endpoint.create(**request)

    async def asend(self, request: dict[str, Any]) -> Any:
        endpoint = self._aclient.completions if "prompt" in request else self._aclient.chat.completions
        return await endpoint.create(**request)

    def generation(self, responses: Sequence[Any]) -> Generation:
        # Completions choices carry .text, chat choices .message.content.
        texts = [(choice.text if hasattr(choice, "text") else choice.message.content) or "" for r in responses for choice in r.choices]
        return Generation(texts=texts, output_tokens=sum(r.usage.completion_tokens for r in responses if r.usage),
                          input_tokens=sum(r.usage.prompt_tokens for r in responses if r.usage))
