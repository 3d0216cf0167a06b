"""LlamaIndex adapter: a query transform that rewrites ``query_str`` for the LLM, not for retrieval.

Only the adaptation to LlamaIndex's types lives here; guards, cache and batching are the core's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llama_index.core.indices.query.query_transform.base import BaseQueryTransform
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.prompts import PromptTemplate as LlamaPromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.query_engine import TransformQueryEngine
from llama_index.core.schema import QueryBundle, QueryType

from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter
from bpo_plugins.templates import PromptTemplate

__all__ = ["BPOQueryTransform", "BPORewriteEvent", "BPOTransformQueryEngine"]

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
        self.rewriter = rewriter or Rewriter.default()
        self.mode: Mode = mode
        self.rewrite_retrieval = rewrite_retrieval
        self.fail_open = fail_open

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
        result = self.rewriter.rewrite(query_bundle.query_str, mode=self.mode, strict=not self.fail_open)
        return self._bundle(query_bundle, result)

    async def arun(self, query: QueryType, metadata: dict[str, Any] | None = None) -> QueryBundle:
        """The async twin of ``run``: the rewrite runs off the event loop."""
        bundle = self._as_bundle(query)
        result = await self.rewriter.arewrite(bundle.query_str, mode=self.mode, strict=not self.fail_open)
        return self._bundle(bundle, result)

    def _get_prompts(self) -> PromptDictType:
        return {"rewrite_prompt": LlamaPromptTemplate(self.rewriter.template.user)}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        if "rewrite_prompt" in prompts:
            text = prompts["rewrite_prompt"].get_template()
            self.rewriter = self.rewriter.with_options(template=PromptTemplate(
                name="custom", user=text, system=self.rewriter.template.system, raw=self.rewriter.template.raw
            ))


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
