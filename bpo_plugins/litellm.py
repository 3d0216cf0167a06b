"""BPO inside LiteLLM's proxy: a ``pre_call`` guardrail that rewrites the last user message, on its
OpenAI routes and on its Anthropic ``/v1/messages`` route (call type ``anthropic_messages``).

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

import logging
from typing import Any

from litellm.integrations.custom_guardrail import CustomGuardrail

from bpo_plugins.outcome import Shape
from bpo_plugins.registry import DEFAULT_MODEL
from bpo_plugins.request_rewriter import RequestRewriter
from bpo_plugins.rewriter import Rewriter

log = logging.getLogger("bpo_plugins.litellm")
#: LiteLLM call types the guardrail rewrites, and the request shape each carries.
REWRITTEN_CALLS = {"completion": Shape.CHAT, "acompletion": Shape.CHAT,
                   "text_completion": Shape.COMPLETIONS, "atext_completion": Shape.COMPLETIONS,
                   "anthropic_messages": Shape.MESSAGES, "aanthropic_messages": Shape.MESSAGES}


class BPOGuardrail(CustomGuardrail):
    """Rewrites each request's last user message (or ``prompt``) with a BPO optimizer, failing open."""

    def __init__(
        self,
        optimizer: str = DEFAULT_MODEL,
        optimizer_backend: str = "auto",
        optimizer_base_url: str | None = None,
        rewrite_timeout_s: float = 2.0,
        rewrite_mode: str = "greedy",
        rewriter: Rewriter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mode = rewrite_mode
        self.rewriter = rewriter or Rewriter.from_spec(
            optimizer, backend=optimizer_backend, base_url=optimizer_base_url, timeout_s=float(rewrite_timeout_s), mode=rewrite_mode)  # type: ignore[arg-type]
        self.requests = RequestRewriter(self.rewriter, timeout_s=float(rewrite_timeout_s))

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        shape = REWRITTEN_CALLS.get(str(getattr(call_type, "value", call_type)))
        if shape is None or (shape in (Shape.CHAT, Shape.MESSAGES) and not isinstance(data.get("messages"), list)):
            return data
        try:
            body, outcome = await self.requests.arewrite(data, shape, mode=self.mode)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - fail open: LiteLLM would block the request on any exception
            log.warning("BPO rewrite skipped (%s); the request goes on unchanged", type(exc).__name__)
            return data
        if outcome.status == "skipped":
            return data
        # What happened, for LiteLLM's logs and spend tracking: the reason only, never the text.
        body["metadata"] = {**(body.get("metadata") or {}), "bpo_rewrite": outcome.header}
        return body
