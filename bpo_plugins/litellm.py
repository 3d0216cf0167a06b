"""BPO inside LiteLLM's proxy: a ``pre_call`` guardrail that rewrites the last user message.

Register it in LiteLLM's ``config.yaml``::

    guardrails:
      - guardrail_name: bpo
        litellm_params:
          guardrail: bpo_plugins.litellm.BPOGuardrail
          mode: pre_call
          default_on: true
          optimizer: bpo-small              # or a model on optimizer_base_url
          rewrite_timeout_s: 2.0

LiteLLM guardrails fail *closed* (an exception blocks the request); a prompt optimizer must not,
so every error and timeout here is caught and the request goes on unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litellm.integrations.custom_guardrail import CustomGuardrail

from bpo_plugins.chat import last_user_prompt
from bpo_plugins.rewriter import Rewriter

log = logging.getLogger("bpo_plugins.litellm")
REWRITTEN_CALLS = ("completion", "acompletion", "text_completion", "atext_completion")


class BPOGuardrail(CustomGuardrail):
    """Rewrites each request's last user message (or ``prompt``) with a BPO optimizer, failing open."""

    def __init__(
        self,
        optimizer: str = "bpo-small",
        optimizer_backend: str = "auto",
        optimizer_base_url: str | None = None,
        rewrite_timeout_s: float = 2.0,
        rewrite_mode: str = "greedy",
        rewriter: Rewriter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.timeout_s = float(rewrite_timeout_s)
        self.rewriter = rewriter or Rewriter.from_spec(
            optimizer, backend=optimizer_backend, base_url=optimizer_base_url, timeout_s=self.timeout_s, mode=rewrite_mode)  # type: ignore[arg-type]

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        if call_type not in REWRITTEN_CALLS:
            return data
        try:
            if isinstance(data.get("messages"), list):
                prompt = last_user_prompt(data["messages"])
                if isinstance(prompt, str):
                    return data
                result = await asyncio.wait_for(self.rewriter.arewrite(prompt.text), self.timeout_s)
                if result.changed:
                    prompt.replace(result.rewritten)
            elif isinstance(data.get("prompt"), str):
                result = await asyncio.wait_for(self.rewriter.arewrite(data["prompt"]), self.timeout_s)
                if result.changed:
                    data["prompt"] = result.rewritten
            else:
                return data
            # What happened, for LiteLLM's logs and spend tracking: the reason only, never the text.
            data.setdefault("metadata", {})["bpo_rewrite"] = "applied" if result.changed else (result.fallback or "unchanged")
        except Exception as exc:  # noqa: BLE001 - fail open: LiteLLM would block the request on any exception
            log.warning("BPO rewrite skipped (%s); the request goes on unchanged", type(exc).__name__)
        return data
