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
from bpo_plugins.outcome import RequestOutcome, Shape
from bpo_plugins.request_rewriter import IntegrationRewriter
from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

__all__ = ["BPOMiddleware", "BPORewriter", "DRPOAligner", "DRPOMiddleware"]

def _chat_view(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Messages as chat messages that share each message's content, for the core's rules."""
    return [{"role": "user" if isinstance(m, HumanMessage) else m.type, "content": m.content} for m in messages]


class _Requests:
    """LangChain inputs as request bodies for the core request rewriter, and its answer back in the
    inputs' own types. A message list is viewed as chat messages that share each message's content,
    so only the message the core rewrote is copied (ids, names and metadata kept)."""

    def __init__(self, inputs: Sequence[Any], input_key: str) -> None:
        self.inputs = list(inputs)
        self.input_key = input_key
        self.bodies: list[dict[str, Any]] = []
        self.shapes: list[Shape] = []
        for value in self.inputs:
            if isinstance(value, (ChatPromptValue, list)):
                messages = value.messages if isinstance(value, ChatPromptValue) else value
                if not all(isinstance(m, BaseMessage) for m in messages):
                    raise TypeError("BPORewriter takes a list of BaseMessage objects")
                self._add({"messages": _chat_view(messages)}, Shape.CHAT)
            else:
                self._add({"prompt": self._text(value)}, Shape.COMPLETIONS)

    def _text(self, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, StringPromptValue):
            return value.text
        if isinstance(value, dict):
            if not isinstance(value.get(self.input_key), str):
                raise TypeError(f"BPORewriter needs a string under input_key={self.input_key!r}; got keys {sorted(value)}")
            return value[self.input_key]
        raise TypeError(f"BPORewriter takes a str, PromptValue, list of messages or dict, not {type(value).__name__}")

    def _add(self, body: dict[str, Any], shape: Shape) -> None:
        self.bodies.append(body)
        self.shapes.append(shape)

    def rebuild(self, done: Sequence[tuple[dict[str, Any], RequestOutcome]]) -> list[Any]:
        outputs = []
        for value, view, (body, _) in zip(self.inputs, self.bodies, done):
            if isinstance(value, str):
                outputs.append(body["prompt"])
            elif isinstance(value, StringPromptValue):
                outputs.append(StringPromptValue(text=body["prompt"]))
            elif isinstance(value, dict):
                outputs.append({**value, self.input_key: body["prompt"]})
            else:
                messages = list(value.messages if isinstance(value, ChatPromptValue) else value)
                for i, (seen, sent) in enumerate(zip(view["messages"], body["messages"])):
                    if sent is not seen:  # the one message the core copied and rewrote
                        messages[i] = messages[i].model_copy(update={"content": sent["content"]})
                outputs.append(ChatPromptValue(messages=messages) if isinstance(value, ChatPromptValue) else messages)
        return outputs


def _results(done: Sequence[tuple[dict[str, Any], RequestOutcome]]) -> list[list[RewriteResult]]:
    """Each input's rewrite, as a list (empty when there was no user text to rewrite)."""
    return [[outcome.result] if outcome.result is not None else [] for _, outcome in done]


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

    def _edge(self) -> IntegrationRewriter:
        return IntegrationRewriter(self.rewriter, mode=self.mode, fail_open=self.fail_open)

    def _rewrite(self, inputs: Sequence[Any]) -> tuple[list[Any], list[list[RewriteResult]]]:
        requests = _Requests(inputs, self.input_key)
        done = self._edge().rewrite(requests.bodies, requests.shapes)
        return requests.rebuild(done), _results(done)

    async def _arewrite(self, inputs: Sequence[Any]) -> tuple[list[Any], list[list[RewriteResult]]]:
        requests = _Requests(inputs, self.input_key)
        done = await self._edge().arewrite(requests.bodies, requests.shapes)
        return requests.rebuild(done), _results(done)

    # -- single --------------------------------------------------------------------------------

    def _invoke(self, value: Any, run_manager: CallbackManagerForChainRun, config: RunnableConfig) -> Any:
        outputs, results = self._rewrite([value])
        _annotate(run_manager, results[0])
        return outputs[0]

    async def _ainvoke(self, value: Any, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig) -> Any:
        outputs, results = await self._arewrite([value])
        _annotate(run_manager, results[0])
        return outputs[0]

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, run_type="prompt")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, run_type="prompt")

    # -- batch: one core batch (one generate call), one traced run per input ------------------

    def _batch(self, values: list[Any], run_manager: list[CallbackManagerForChainRun], config: list[RunnableConfig]) -> list[Any]:
        outputs, results = self._rewrite(values)
        for manager, own in zip(run_manager, results):
            _annotate(manager, own)
        return outputs

    async def _abatch(
        self, values: list[Any], run_manager: list[AsyncCallbackManagerForChainRun], config: list[RunnableConfig]
    ) -> list[Any]:
        outputs, results = await self._arewrite(values)
        for manager, own in zip(run_manager, results):
            _annotate(manager, own)
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
        self.edge = IntegrationRewriter(rewriter, mode=mode, fail_open=fail_open)

    def _request(self, request: ModelRequest, requests: _Requests, done: list[tuple[dict[str, Any], RequestOutcome]]) -> ModelRequest:
        results = _results(done)[0]
        if not results:
            return request
        try:
            # Callbacks and tracing see it as a "bpo_rewrite" event of the agent's run.
            dispatch_custom_event("bpo_rewrite", _metadata(results))
        except RuntimeError:
            pass  # called outside a runnable context: there is no run to report to
        return request.override(messages=requests.rebuild(done)[0])

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        requests = _Requests([request.messages], "input")
        return handler(self._request(request, requests, self.edge.rewrite(requests.bodies, requests.shapes)))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> Any:
        requests = _Requests([request.messages], "input")
        return await handler(self._request(request, requests, await self.edge.arewrite(requests.bodies, requests.shapes)))


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
    (or a message list), ready for any chat model; for a base-model (raw) preset such as ``llama3-8b``,
    a string prompt value with DRPO's whole text, for a completion LLM (stop it at ``<END>``)."""

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
        conversations = [_as_dicts(v) for v in values]
        if self._raw:
            return [StringPromptValue(text=text) for text in self._pipeline.render_batch(conversations)]
        return [_like(v, a.messages) for v, a in zip(values, self._pipeline.align_batch(conversations))]

    async def _aalign(self, values: list[Any]) -> list[Any]:
        conversations = [_as_dicts(v) for v in values]
        if self._raw:
            return [StringPromptValue(text=text) for text in await self._pipeline.arender_batch(conversations)]
        return [_like(v, a.messages) for v, a in zip(values, await self._pipeline.aalign_batch(conversations))]

    @property
    def _raw(self) -> bool:
        """A base-model preset: the output is DRPO's whole text prompt, for a completion LLM."""
        return bool(self._pipeline.alignment is not None and self._pipeline.alignment.format.raw)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(lambda value: self._align([value])[0], input, config, run_type="prompt")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        async def one(value: Any) -> Any:
            return (await self._aalign([value]))[0]

        return await self._acall_with_config(one, input, config, run_type="prompt")

    # One BPO batch (one generate call) for every conversation, and one traced run per input with its own config.
    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        if not inputs:
            return []
        return self._batch_with_config(lambda values: self._align(list(values)), inputs, config,
                                       return_exceptions=return_exceptions, run_type="prompt")

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        if not inputs:
            return []

        async def align(values: list[Any]) -> list[Any]:
            return await self._aalign(list(values))

        return await self._abatch_with_config(align, inputs, config, return_exceptions=return_exceptions, run_type="prompt")


class DRPOMiddleware(AgentMiddleware):
    """Before each model call of a ``create_agent`` agent, put DRPO's aligned system prompt and the
    examples retrieved for the latest user message in front of the agent's own system prompt."""

    def __init__(self, alignment: Any, k: int | None = None) -> None:
        super().__init__()
        self.pipeline = AlignmentPipeline(alignment, bpo=False, k=k)

    def _request(self, request: ModelRequest) -> ModelRequest:
        # The one request rule aligns the conversation (the agent's system prompt in front, so it is
        # kept after DRPO's); only its system message is taken. The agent's turns go on as the agent
        # keeps them: DRPO's query format ends the user turn at ``<START>``, which in an agent loop
        # sits before the tool calls and results that follow it, and the agent's model is not
        # stopped at ``<END>``.
        own = request.system_message
        messages = [{"role": "system", "content": own.content}] if own is not None else []
        aligned = self.pipeline.apply([*messages, *_chat_view(request.messages)])
        return request.override(system_message=SystemMessage(aligned[0]["content"]))

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        return handler(self._request(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> Any:
        return await handler(self._request(request))
