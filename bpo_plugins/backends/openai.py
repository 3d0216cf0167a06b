"""An optimizer behind any OpenAI-compatible chat endpoint: vLLM or TGI serving THUDM/BPO, or an API LLM."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from typing import Any

from bpo_plugins.backends.base import Generation
from bpo_plugins.backends.http import HTTPBackend, require
from bpo_plugins.decoding import Decoding, fit_minimum
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PROMPT_ENGINEER, PromptTemplate, pick_local_template

__all__ = ["OpenAIBackend"]

#: Request fields a server may not know. ``min_tokens``, ``bad_words`` and ``stop_token_ids`` are vLLM's
#: extra sampling fields (SGLang takes ``min_tokens``); ``top_p``, ``stop`` and ``seed`` are OpenAI's own,
#: which some servers lack.
_OPTIONAL_FIELDS = ("min_tokens", "bad_words", "stop_token_ids", "top_p", "stop", "seed")
#: How servers say they do not know a field: OpenAI ("Unrecognized request argument supplied"), vLLM's and
#: SGLang's pydantic ("Extra inputs are not permitted"), TGI ("unknown field"). A 400 about a field's value
#: (vLLM: "min_tokens must be less than or equal to max_tokens") says none of these, and drops nothing.
_UNKNOWN_FIELD = re.compile(r"unrecogni[sz]ed|unknown|unsupported|not supported|extra (?:inputs?|fields?)|not permitted|unexpected", re.I)
#: The newline of THUDM/BPO's Llama-2 vocabulary (``<0x0A>``): the 13 of the reference's ``eos_token_id=[eos, 13]``.
LLAMA2_NEWLINE_ID = 13
#: Per server (base URL): the optional fields it answered 400 for. Remembered for the process, so each
#: server costs one failed request per field however many Rewriters talk to it.
_REJECTED: dict[str, set[str]] = {}
_REJECTED_LOCK = threading.Lock()


def _estimate_tokens(text: str) -> int:
    """About how many tokens a Llama tokenizer makes of ``text`` with its BOS: one per short word or mark,
    one more per 5 letters of a longer word. Over HTTP there is no tokenizer to ask."""
    return 1 + sum(max(1, round(len(piece) / 5)) for piece in re.findall(r"\w+|[^\w\s]", text))


def _unknown_field(exc: Exception, fields: Sequence[str]) -> str | None:
    """The one of ``fields`` a 400 answer says the server does not know (named by its ``param`` or its
    message, which must say the field is unknown), or None."""
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    message = str(error.get("message")) if isinstance(error, dict) else str(exc)
    if not _UNKNOWN_FIELD.search(message):
        return None
    param = error.get("param") if isinstance(error, dict) else None
    if param in fields:
        return str(param)
    return next((f for f in fields if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", message)), None)


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
        #: The token id of a newline in the served checkpoint's vocabulary (THUDM/BPO is Llama-2's).
        self.newline_token_id = LLAMA2_NEWLINE_ID
        self._bad_request = openai.BadRequestError
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries)
        self._new_aclient = lambda: openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=max_retries)
        self._aclient = self._new_aclient()

    def requests(self, prompt: str, template: PromptTemplate, decoding: Decoding, timeout_s: float | None) -> list[dict[str, Any]]:
        rejected = self._rejected()
        # BPO's minimum length goes to a checkpoint only (see _checkpoint_fields), with a cap it fits under.
        minimum = None
        if template.raw is not None and decoding.min_tokens_over_prompt is not None and "min_tokens" not in rejected:
            decoding, (minimum,) = fit_minimum(decoding, [_estimate_tokens(prompt) + decoding.min_tokens_over_prompt])
        # vLLM holds stop token ids back until min_tokens, but not stop strings: with a minimum, the
        # newline goes as the checkpoint's token id (the reference's eos_token_id=[eos, 13]).
        newline_id = minimum is not None and decoding.stop_at_newline and "stop_token_ids" not in rejected
        request: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature if decoding.do_sample else 0.0,
            "n": decoding.num_candidates,  # one request: vLLM shares the prompt's prefill across samples
        }
        if decoding.do_sample and decoding.top_p < 1.0:
            request["top_p"] = decoding.top_p
        stops = ["\n"] if decoding.stop_at_newline and not newline_id else []
        stops += [stop for stop in decoding.stop if stop not in stops]
        if stops:
            request["stop"] = stops[:4]  # OpenAI takes at most 4
        if decoding.seed is not None:  # DRPO's roles: its OpenAI client sends seed=0 on every call
            request["seed"] = decoding.seed
        if template.raw is not None:
            # A BPO checkpoint on vLLM or SGLang: BPO's exact [INST] format through /v1/completions, as it
            # was trained (the server adds BOS); a chat endpoint would wrap it in another template.
            request["prompt"] = template.render_raw(prompt)
            extra = self._checkpoint_fields(decoding, minimum, newline_id)
            if extra:
                request["extra_body"] = extra
        else:
            # An API LLM: what OpenAI's chat API takes. Banned words would need logit_bias, which needs
            # the API model's tokenizer; a general LLM does not write BPO's training markers, and every
            # output is cut at them anyway (guards.clean_output).
            request["messages"] = template.messages(prompt)
        if timeout_s is not None:
            request["timeout"] = timeout_s
        for name in rejected & request.keys():
            del request[name]
        return [request]

    def _checkpoint_fields(self, decoding: Decoding, minimum: int | None, newline_id: bool) -> dict[str, Any]:
        """vLLM's extra sampling fields for BPO's aggressive mode (``min_length``, ``bad_words_ids`` and the
        newline of ``eos_token_id`` in the reference), minus those this server rejected. vLLM holds back
        EOS and ``stop_token_ids`` until ``min_tokens``."""
        extra: dict[str, Any] = {}
        if minimum is not None:
            extra["min_tokens"] = minimum
        if newline_id:
            extra["stop_token_ids"] = [self.newline_token_id]
        if decoding.banned_words:
            extra["bad_words"] = list(decoding.banned_words)
        rejected = self._rejected()
        return {name: value for name, value in extra.items() if name not in rejected}

    def _rejected(self) -> set[str]:
        with _REJECTED_LOCK:
            return set(_REJECTED.get(self.revision, ()))

    def _without_rejected(self, request: dict[str, Any], exc: Exception) -> dict[str, Any] | None:
        """``request`` without the optional field a 400 answer names, remembered for this server; None
        when the answer names none of the fields the request still carries."""
        extra = dict(request.get("extra_body") or {})
        present = [f for f in _OPTIONAL_FIELDS if f in request or f in extra]
        name = _unknown_field(exc, present)
        if name is None:
            return None
        with _REJECTED_LOCK:
            _REJECTED.setdefault(self.revision, set()).add(name)
        retry = {k: v for k, v in request.items() if k != name}
        if name == "stop_token_ids":  # the newline goes back as a stop string
            retry["stop"] = ["\n", *retry.get("stop", [])][:4]
        if name in extra:
            del extra[name]
            retry["extra_body"] = extra
            if not extra:
                del retry["extra_body"]
        return retry

    def send(self, request: dict[str, Any]) -> Any:
        while True:
            endpoint = self._client.completions if "prompt" in request else self._client.chat.completions
            try:
                return endpoint.create(**request)
            except self._bad_request as exc:
                retry = self._without_rejected(request, exc)
                if retry is None:
                    raise
                request = retry

    async def asend(self, request: dict[str, Any]) -> Any:
        while True:
            endpoint = self._aclient.completions if "prompt" in request else self._aclient.chat.completions
            try:
                return await endpoint.create(**request)
            except self._bad_request as exc:
                retry = self._without_rejected(request, exc)
                if retry is None:
                    raise
                request = retry

    def generation(self, responses: Sequence[Any]) -> Generation:
        # Completions choices carry .text, chat choices .message.content.
        texts = [(choice.text if hasattr(choice, "text") else choice.message.content) or "" for r in responses for choice in r.choices]
        return Generation(texts=texts, output_tokens=sum(r.usage.completion_tokens for r in responses if r.usage),
                          input_tokens=sum(r.usage.prompt_tokens for r in responses if r.usage))
