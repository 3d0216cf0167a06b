"""LangChain adapters: ``prompt | BPORewriter() | llm`` and ``create_agent(..., middleware=[BPOMiddleware()])``;
for DRPO, ``prompt | DRPOAligner("llama3-8b-instruct") | llm`` and ``DRPOMiddleware(...)``; for both,
``DRPOAligner(preset, bpo=True)``.

Only the adaptation to LangChain's types lives here; modes, guards, cache and batching are the
core :class:`~bpo_plugins.Rewriter`'s, and alignment is :class:`~bpo_plugins.drpo.AlignmentPipeline`'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.callbacks import CallbackManagerForChainRun
from langchain_core.callbacks.manager import AsyncCallbackManagerForChainRun, dispatch_custom_event
from langchain_core.messages import (
    BaseMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.prompt_values import ChatPromptValue, PromptValue, StringPromptValue
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.tracers.base import BaseTracer
from pydantic import ConfigDict, Field

from bpo_plugins.drpo import AlignmentPipeline
from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

__all__ = ["BPOMiddleware", "BPORewriter", "DRPOAligner", "DRPOMiddleware"]

# One slot to rewrite: (input index, message index or None, content-part index or None).
_Slot = tuple[int, int | None, int | None]


def _last_human(messages: Sequence[BaseMessage]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], HumanMessage)), None)


def _message_texts(message: BaseMessage) -> list[tuple[int | None, str]]:
    """The text parts of a message: the whole content, or each text block of a multimodal list."""
    if isinstance(message.content, str):
        return [(None, message.content)]
    return [
        (j, part["text"])
        for j, part in enumerate(message.content)
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    ]


def _with_text(message: BaseMessage, part: int | None, text: str) -> BaseMessage:
    if part is None:
        return message.model_copy(update={"content": text})
    content = list(message.content)
    content[part] = {**content[part], "text": text}  # type: ignore[dict-item]
    return message.model_copy(update={"content": content})


class _Texts:
    """Pull the rewritable texts out of LangChain inputs and put the rewrites back, type for type."""

    def __init__(self, inputs: Sequence[Any], input_key: str) -> None:
        self.inputs = list(inputs)
        self.input_key = input_key
        self.slots: list[_Slot] = []
        self.texts: list[str] = []
        for i, value in enumerate(self.inputs):
            if isinstance(value, str):
                self._add(i, None, None, value)
            elif isinstance(value, StringPromptValue):
                self._add(i, None, None, value.text)
            elif isinstance(value, (ChatPromptValue, list)):
                messages = value.messages if isinstance(value, ChatPromptValue) else value
                if not all(isinstance(m, BaseMessage) for m in messages):
                    raise TypeError("BPORewriter takes a list of BaseMessage objects")
                index = _last_human(messages)
                if index is not None:
                    for part, text in _message_texts(messages[index]):
                        self._add(i, index, part, text)
            elif isinstance(value, dict):
                if not isinstance(value.get(input_key), str):
                    raise TypeError(f"BPORewriter needs a string under input_key={input_key!r}; got keys {sorted(value)}")
                self._add(i, None, None, value[input_key])
            else:
                raise TypeError(
                    f"BPORewriter takes a str, PromptValue, list of messages or dict, not {type(value).__name__}"
                )

    def _add(self, i: int, message: int | None, part: int | None, text: str) -> None:
        self.slots.append((i, message, part))
        self.texts.append(text)

    def rebuild(self, results: Sequence[RewriteResult]) -> list[Any]:
        outputs = list(self.inputs)
        for (i, message, part), result in zip(self.slots, results):
            value = outputs[i]
            if isinstance(value, str):
                outputs[i] = result.rewritten
            elif isinstance(value, StringPromptValue):
                outputs[i] = StringPromptValue(text=result.rewritten)
            elif isinstance(value, dict):
                outputs[i] = {**value, self.input_key: result.rewritten}
            else:
                messages = list(value.messages if isinstance(value, ChatPromptValue) else value)
                assert message is not None
                messages[message] = _with_text(messages[message], part, result.rewritten)
                outputs[i] = ChatPromptValue(messages=messages) if isinstance(value, ChatPromptValue) else messages
        return outputs

    def results_of(self, i: int, results: Sequence[RewriteResult]) -> list[RewriteResult]:
        return [r for (j, _, _), r in zip(self.slots, results) if j == i]


def _metadata(results: Sequence[RewriteResult]) -> dict[str, Any]:
    if len(results) == 1:
        r = results[0]
        return {"bpo_original": r.original, "bpo_rewritten": r.rewritten, "bpo_fallback": r.fallback and r.fallback.value,
                "bpo_detail": r.detail, "bpo_mode": r.mode, "bpo_cached": r.cached, "bpo_latency_s": r.latency_s}
    return {"bpo_rewrites": [r.to_dict() for r in results]}


def _annotate(run_manager: CallbackManagerForChainRun | AsyncCallbackManagerForChainRun, results: Sequence[RewriteResult]) -> None:
    """Put the rewrite into this run's metadata, as langchain-core itself adds metadata to finished LLM runs."""
    for handler in run_manager.handlers:
        if isinstance(handler, BaseTracer):
            run = handler.run_map.get(str(run_manager.run_id))
            if run is not None:
                run.extra.setdefault("metadata", {}).update(_metadata(results))


class BPORewriter(RunnableSerializable[Any, Any]):
    """Rewrite the prompt flowing through a chain with BPO; the output has the input's type."""

    rewriter: Rewriter | None = Field(default=None, exclude=True)
    mode: Mode = "greedy"
    fail_open: bool = True
    input_key: str = "input"

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def core(self) -> Rewriter:
        if self.rewriter is None:
            self.rewriter = Rewriter.default()
        return self.rewriter

    def _rewrite(self, inputs: Sequence[Any]) -> tuple[_Texts, list[Any], list[RewriteResult]]:
        texts = _Texts(inputs, self.input_key)
        results = self.core.rewrite_batch(texts.texts, mode=self.mode, strict=not self.fail_open) if texts.texts else []
        return texts, texts.rebuild(results), results

    async def _arewrite(self, inputs: Sequence[Any]) -> tuple[_Texts, list[Any], list[RewriteResult]]:
        texts = _Texts(inputs, self.input_key)
        results = await self.core.arewrite_batch(texts.texts, mode=self.mode, strict=not self.fail_open) if texts.texts else []
        return texts, texts.rebuild(results), results

    # -- single --------------------------------------------------------------------------------

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Any:
        _, outputs, results = self._rewrite([value])
        _annotate(run_manager, results)
        return outputs[0]

    async def _ainvoke(self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig) -> Any:
        _, outputs, results = await self._arewrite([value])
        _annotate(run_manager, results)
        return outputs[0]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, run_type="prompt")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, run_type="prompt")

    # -- batch: one core batch (one generate call), one traced run per input ------------------

    def _batch(self, values: list[Any], run_manager: list[CallbackManagerForChainRun], config: list[RunnableConfig]) -> list[Any]:
        texts, outputs, results = self._rewrite(values)
        for i, manager in enumerate(run_manager):
            _annotate(manager, texts.results_of(i, results))
        return outputs

    async def _abatch(
        self, values: list[Any], run_manager: list[AsyncCallbackManagerForChainRun], config: list[RunnableConfig]
    ) -> list[Any]:
        texts, outputs, results = await self._arewrite(values)
        for i, manager in enumerate(run_manager):
            _annotate(manager, texts.results_of(i, results))
        return outputs

    def batch(
        self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False, **kwargs: Any
    ) -> list[Any]:
        if not inputs:
            return []
        return self._batch_with_config(self._batch, inputs, config, return_exceptions=return_exceptions, run_type="prompt")

    async def abatch(
        self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *, return_exceptions: bool = False, **kwargs: Any
    ) -> list[Any]:
        if not inputs:
            return []
        return await self._abatch_with_config(self._abatch, inputs, config, return_exceptions=return_exceptions, run_type="prompt")


class BPOMiddleware(AgentMiddleware):
    """Rewrite the latest user message before each model call of a ``create_agent`` agent.

    The agent's state keeps the user's own words; only the request sent to the model changes,
    and greedy-mode caching makes the repeated calls of a tool loop free.
    """

    def __init__(self, rewriter: Rewriter | None = None, mode: Mode = "greedy", fail_open: bool = True) -> None:
        super().__init__()
        self.rewriter = rewriter
        self.mode: Mode = mode
        self.fail_open = fail_open

    @property
    def core(self) -> Rewriter:
        if self.rewriter is None:
            self.rewriter = Rewriter.default()
        return self.rewriter

    def _request(self, request: ModelRequest, texts: _Texts, results: list[RewriteResult]) -> ModelRequest:
        if not results:
            return request
        try:
            # Callbacks and tracing see it as a "bpo_rewrite" event of the agent's run.
            dispatch_custom_event("bpo_rewrite", _metadata(results))
        except RuntimeError:
            pass  # called outside a runnable context: there is no run to report to
        return request.override(messages=texts.rebuild(results)[0])

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        texts = _Texts([request.messages], "input")
        results = self.core.rewrite_batch(texts.texts, mode=self.mode, strict=not self.fail_open) if texts.texts else []
        return handler(self._request(request, texts, results))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> Any:
        texts = _Texts([request.messages], "input")
        results = await self.core.arewrite_batch(texts.texts, mode=self.mode, strict=not self.fail_open) if texts.texts else []
        return await handler(self._request(request, texts, results))


def _as_dicts(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, PromptValue):
        value = value.to_messages()
    elif isinstance(value, str):
        value = [HumanMessage(value)]
    return convert_to_openai_messages(convert_to_messages(value))  # type: ignore[return-value]


def _like(value: Any, messages: list[dict[str, Any]]) -> Any:
    """Aligned messages in the input's type: a prompt value stays one, anything else becomes messages."""
    converted = convert_to_messages(messages)
    return ChatPromptValue(messages=converted) if isinstance(value, PromptValue) else converted


class DRPOAligner(RunnableSerializable[Any, Any]):
    """DRPO's aligned system prompt and retrieved examples on each conversation flowing through a
    chain; with ``bpo=True`` BPO rewrites the user's prompt first. The output is a chat prompt value
    (or a message list), ready for any chat model."""

    alignment: Any = Field(description="A DRPO preset name, an artifact path, or an Alignment.")
    bpo: bool = False
    rewriter: Rewriter | None = Field(default=None, exclude=True)
    mode: Mode = "greedy"
    fail_open: bool = True
    k: int | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, alignment: Any, **kwargs: Any) -> None:
        super().__init__(alignment=alignment, **kwargs)
        self._pipeline = AlignmentPipeline(alignment, self.rewriter, bpo=self.bpo, mode=self.mode, fail_open=self.fail_open, k=self.k)

    def _align(self, values: list[Any]) -> list[Any]:
        aligned = self._pipeline.align_batch([_as_dicts(v) for v in values])
        return [_like(v, a.messages) for v, a in zip(values, aligned)]

    async def _aalign(self, values: list[Any]) -> list[Any]:
        aligned = await self._pipeline.aalign_batch([_as_dicts(v) for v in values])
        return [_like(v, a.messages) for v, a in zip(values, aligned)]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(lambda value: self._align([value])[0], input, config, run_type="prompt")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        async def one(value: Any) -> Any:
            return (await self._aalign([value]))[0]

        return await self._acall_with_config(one, input, config, run_type="prompt")

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        # One BPO batch (one generate call) for every conversation, not one per thread.
        return self._align(list(inputs)) if inputs else []


class DRPOMiddleware(AgentMiddleware):
    """Before each model call of a ``create_agent`` agent, put DRPO's aligned system prompt and the
    examples retrieved for the latest user message in front of the agent's own system prompt."""

    def __init__(self, alignment: Any, k: int | None = None) -> None:
        super().__init__()
        self.pipeline = AlignmentPipeline(alignment, bpo=False, k=k)

    def _request(self, request: ModelRequest) -> ModelRequest:
        last = _last_human(request.messages)
        query = request.messages[last].text if last is not None else ""
        own = request.system_message.text if request.system_message is not None else None
        system = self.pipeline.alignment.system_message(query, keep=own)
        return request.override(system_message=SystemMessage(system))

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        return handler(self._request(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> Any:
        return await handler(self._request(request))
