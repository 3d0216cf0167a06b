"""LlamaIndex adapters: a query transform that rewrites ``query_str`` for the LLM, not for retrieval;
DRPO's aligned system prompt and examples on a query engine (``align_query_engine``) or a chat
engine (``DRPOChatEngine``); both at once: ``BPOTransformQueryEngine(align_query_engine(engine, preset))``.

Only the adaptation to LlamaIndex's types lives here; guards, cache and batching are the core's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.indices.query.query_transform.base import BaseQueryTransform
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.prompts import PromptTemplate as LlamaPromptTemplate
from llama_index.core.prompts.base import BasePromptTemplate, SelectorPromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.query_engine import TransformQueryEngine
from llama_index.core.schema import QueryBundle, QueryType

from bpo_plugins.drpo import AlignmentPipeline
from bpo_plugins.request_rewriter import IntegrationRewriter
from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter
from bpo_plugins.templates import PromptTemplate

__all__ = ["BPOQueryTransform", "BPORewriteEvent", "BPOTransformQueryEngine", "DRPOChatEngine", "align_query_engine"]

dispatcher = get_dispatcher(__name__)


class BPORewriteEvent(BaseEvent):
    """Emitted for every rewrite, so instrumentation handlers see the original, the rewrite and any fallback."""

    original: str
    rewritten: str
    fallback: str | None = None
    detail: str | None = None
    cached: bool = False

    @classmethod
    def class_name(cls) -> str:
        return "BPORewriteEvent"


class BPOQueryTransform(BaseQueryTransform):
    """Rewrite the query the LLM answers; by default retrieval still embeds the user's own words.

    Args:
        rewriter: the core Rewriter; the bundled ``bpo-small`` when omitted.
        mode: greedy (default, cached), stable or aggressive.
        rewrite_retrieval: embed the rewritten query for retrieval too.
    """

    def __init__(
        self, rewriter: Rewriter | None = None, mode: Mode = "greedy", rewrite_retrieval: bool = False, fail_open: bool = True
    ) -> None:
        self.edge = IntegrationRewriter(rewriter, mode=mode, fail_open=fail_open)
        self.rewrite_retrieval = rewrite_retrieval

    @property
    def rewriter(self) -> Rewriter:
        return self.edge.rewriter

    def _bundle(self, query_bundle: QueryBundle, result: RewriteResult) -> QueryBundle:
        dispatcher.event(
            BPORewriteEvent(
                original=result.original, rewritten=result.rewritten, detail=result.detail, cached=result.cached,
                fallback=None if result.fallback is None else result.fallback.value,
            )
        )
        embed = [result.rewritten] if self.rewrite_retrieval else query_bundle.embedding_strs
        return dataclasses.replace(query_bundle, query_str=result.rewritten, custom_embedding_strs=embed)

    @staticmethod
    def _as_bundle(query: QueryType) -> QueryBundle:
        return QueryBundle(query_str=query, custom_embedding_strs=[query]) if isinstance(query, str) else query

    def _run(self, query_bundle: QueryBundle, metadata: dict[str, Any]) -> QueryBundle:
        return self._bundle(query_bundle, self.edge.rewrite_texts([query_bundle.query_str])[0])

    async def arun(self, query: QueryType, metadata: dict[str, Any] | None = None) -> QueryBundle:
        """The async twin of ``run``: the rewrite runs off the event loop."""
        bundle = self._as_bundle(query)
        return self._bundle(bundle, (await self.edge.arewrite_texts([bundle.query_str]))[0])

    def _get_prompts(self) -> PromptDictType:
        return {"rewrite_prompt": LlamaPromptTemplate(self.rewriter.template.user)}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        if "rewrite_prompt" in prompts:
            text = prompts["rewrite_prompt"].get_template()
            rewriter = self.rewriter.with_options(template=PromptTemplate(
                name="custom", user=text, system=self.rewriter.template.system, raw=self.rewriter.template.raw
            ))
            self.edge = IntegrationRewriter(rewriter, mode=self.edge.mode, fail_open=self.edge.fail_open)


class BPOTransformQueryEngine(TransformQueryEngine):
    """``TransformQueryEngine`` whose async paths await the rewrite instead of blocking the loop.

    (The stock engine's ``aquery`` calls the synchronous ``run``: run-llama/llama_index#17371.)
    """

    def __init__(self, query_engine: Any, query_transform: BPOQueryTransform | None = None, **kwargs: Any) -> None:
        super().__init__(query_engine, query_transform or BPOQueryTransform(), **kwargs)

    async def _aquery(self, query_bundle: QueryBundle) -> Any:
        transform: BPOQueryTransform = self._query_transform  # type: ignore[assignment]
        return await self._query_engine.aquery(await transform.arun(query_bundle, self._transform_metadata))

    async def asynthesize(self, query_bundle: QueryBundle, nodes: Any, additional_source_nodes: Any = None) -> Any:
        transform: BPOQueryTransform = self._query_transform  # type: ignore[assignment]
        bundle = await transform.arun(query_bundle, self._transform_metadata)
        return await self._query_engine.asynthesize(bundle, nodes=nodes, additional_source_nodes=additional_source_nodes)


#: The response-synthesis prompts that carry the user's query (tree-summarize's carries it too).
SYNTHESIS_PROMPTS = ("text_qa_template", "refine_template", "summary_template")


def _system_text(messages: list[ChatMessage]) -> str | None:
    own = "\n\n".join(m.content or "" for m in messages if m.role == MessageRole.SYSTEM)
    return own or None


def _aligned_text_template(template: BasePromptTemplate, pipeline: AlignmentPipeline) -> LlamaPromptTemplate:
    """For a base-model (raw) preset: one text template, DRPO's prompt and the examples retrieved
    for each query, then the engine's own template as DRPO's query, answered after ``<START>``."""
    if isinstance(template, SelectorPromptTemplate):
        template = template.default_template
    alignment = pipeline.alignment

    def drpo_system(**kwargs: Any) -> str:
        return alignment.system_message(str(kwargs.get("query_str", "")))

    body = alignment.format.render_raw("", template.get_template())
    return LlamaPromptTemplate("{drpo_system}" + body, prompt_type=template.metadata.get("prompt_type", "custom"),
                               function_mappings={"drpo_system": drpo_system})


def _aligned_template(template: BasePromptTemplate, pipeline: AlignmentPipeline) -> BasePromptTemplate:
    """``template`` with DRPO's system message, its examples retrieved for each query at format time.

    A query engine formats its prompts itself, from templates filled at synthesis time: there is no
    chat request to give the one request rule, so the system message is Alignment's own piece
    (:meth:`~bpo_plugins.drpo.Alignment.system_message`), the query being the template's ``query_str``."""
    if pipeline.alignment.format.raw:
        return _aligned_text_template(template, pipeline)
    if isinstance(template, SelectorPromptTemplate):  # prefer the chat variant LlamaIndex picks for chat models
        template = next((t for _, t in template.conditionals or [] if isinstance(t, ChatPromptTemplate)), template.default_template)
    if isinstance(template, ChatPromptTemplate):
        own, body = _system_text(template.message_templates), [m for m in template.message_templates if m.role != MessageRole.SYSTEM]
    else:
        own, body = None, [ChatMessage(role=MessageRole.USER, content=template.get_template())]
    alignment = pipeline.alignment

    def drpo_system(**kwargs: Any) -> str:
        return alignment.system_message(str(kwargs.get("query_str", "")), keep=own)

    return ChatPromptTemplate([ChatMessage(role=MessageRole.SYSTEM, content="{drpo_system}"), *body],
                              prompt_type=template.metadata.get("prompt_type", "custom"), function_mappings={"drpo_system": drpo_system})


def align_query_engine(query_engine: Any, alignment: Any, k: int | None = None) -> Any:
    """Put DRPO's aligned system prompt, with examples retrieved per query, on a query engine's
    synthesis prompts (in place; the engine is returned for chaining). A base-model (raw) preset
    makes them text templates for a completion LLM, as DRPO serves base models."""
    pipeline = AlignmentPipeline(alignment, bpo=False, k=k)
    prompts = {key: _aligned_template(template, pipeline) for key, template in query_engine.get_prompts().items()
               if key.rsplit(":", 1)[-1] in SYNTHESIS_PROMPTS}
    if not prompts:
        raise ValueError(f"{type(query_engine).__name__} has no synthesis prompt ({', '.join(SYNTHESIS_PROMPTS)}) to align")
    query_engine.update_prompts(prompts)
    return query_engine


class DRPOChatEngine(SimpleChatEngine):
    """A chat engine whose system message, for every user message, is DRPO's aligned prompt plus the
    examples retrieved for that message (then the engine's own system prompt, if any)."""

    def __init__(self, *args: Any, alignment: Any, k: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pipeline = AlignmentPipeline(alignment, bpo=False, k=k)
        self._own_prefix = list(self._prefix_messages)

    @classmethod
    def from_alignment(cls, alignment: Any, *, k: int | None = None, **kwargs: Any) -> DRPOChatEngine:
        """``SimpleChatEngine.from_defaults`` keyword arguments (``llm``, ``system_prompt``, ``memory``...), aligned."""
        base = SimpleChatEngine.from_defaults(**kwargs)
        return cls(base._llm, base._memory, base._prefix_messages, base.callback_manager, alignment=alignment, k=k)

    def _align(self, message: str) -> None:
        # The one request rule aligns the message (the engine's system prompt in front, kept after
        # DRPO's); only its system message is taken: the engine puts the user's message in its
        # memory and lays out the turns itself.
        own = _system_text(self._own_prefix)
        conversation = [{"role": "system", "content": own}] if own else []
        system = self._pipeline.apply([*conversation, {"role": "user", "content": message}])[0]["content"]
        rest = [m for m in self._own_prefix if m.role != MessageRole.SYSTEM]
        self._prefix_messages = [ChatMessage(role=MessageRole.SYSTEM, content=system), *rest]

    def chat(self, message: str, chat_history: Any = None) -> Any:
        self._align(message)
        return super().chat(message, chat_history)

    def stream_chat(self, message: str, chat_history: Any = None) -> Any:
        self._align(message)
        return super().stream_chat(message, chat_history)

    async def achat(self, message: str, chat_history: Any = None) -> Any:
        self._align(message)
        return await super().achat(message, chat_history)

    async def astream_chat(self, message: str, chat_history: Any = None) -> Any:
        self._align(message)
        return await super().astream_chat(message, chat_history)
