"""BPO and DRPO in one step: BPO rewrites the user's prompt, DRPO frames it with an aligned system
prompt and retrieved examples. Every integration's BPO+DRPO line is this object.

    from bpo_plugins.drpo import AlignmentPipeline
    pipeline = AlignmentPipeline("llama3-8b-instruct")            # a DRPO preset or artifact, plus bpo-small
    messages = pipeline.apply([{"role": "user", "content": "tips for a job interview"}])

Both steps are the core request rewriter's (:mod:`bpo_plugins.request_rewriter`); this class holds the
settings. Examples are retrieved for the user's own words, not the rewrite: the rewrite adds detail
that would pull retrieval away from the intent. A rewrite that fails falls back to the original
(``fail_open``), and the alignment is applied either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.alignment import Alignment
from bpo_plugins.drpo.formats import CHAT_FORMAT
from bpo_plugins.drpo.presets import load_alignment
from bpo_plugins.outcome import RequestOutcome, Shape
from bpo_plugins.request_rewriter import IntegrationRewriter
from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

__all__ = ["Aligned", "AlignmentPipeline"]

Messages = list[dict[str, Any]]


@dataclass
class Aligned:
    messages: Messages
    #: BPO's result for the last user message (None: BPO off, or no user text to rewrite).
    rewrite: RewriteResult | None


class AlignmentPipeline(IntegrationRewriter):
    """``alignment``: a DRPO preset name, an artifact path or an :class:`~bpo_plugins.drpo.Alignment`
    (None: BPO only). ``rewriter``: the BPO optimizer (default: the shared ``bpo-small``); ``bpo=False``: DRPO only."""

    def __init__(self, alignment: str | Path | Alignment | None = None, rewriter: Rewriter | None = None, *, bpo: bool = True,
                 mode: Mode = "greedy", fail_open: bool = True, k: int | None = None) -> None:
        if alignment is None and not bpo:
            raise ValueError("an AlignmentPipeline needs BPO, a DRPO alignment, or both")
        if isinstance(alignment, (str, Path)):
            alignment = load_alignment(alignment, k=k)
        elif alignment is not None and k is not None:
            alignment = replace(alignment, k=k)
        super().__init__(rewriter, mode=mode, fail_open=fail_open, bpo=bpo, alignment=alignment)
        # Message lists stay message lists (a raw preset's prompt framed as chat); render() gives the text.
        self._chat: IntegrationRewriter = self if alignment is None or not alignment.format.raw else self._with(alignment.with_format(CHAT_FORMAT))
        self._text = None if alignment is None else self._with(alignment.with_format(replace(alignment.format, raw=True)))

    def _with(self, alignment: Alignment) -> IntegrationRewriter:
        return IntegrationRewriter(self._rewriter, mode=self.mode, fail_open=self.fail_open, bpo=self.bpo, alignment=alignment)

    def align_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[Aligned]:
        return [_aligned(body, outcome) for body, outcome in self._chat.rewrite(_bodies(conversations), Shape.CHAT)]

    async def aalign_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[Aligned]:
        done = await self._chat.arewrite(_bodies(conversations), Shape.CHAT)
        return [_aligned(body, outcome) for body, outcome in done]

    def apply(self, messages: Sequence[dict[str, Any]]) -> Messages:
        """An OpenAI-style message list, rewritten and aligned."""
        return self.align_batch([messages])[0].messages

    def apply_to_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat request body rewritten and aligned (DRPO's stop strings added); for a raw
        (base-model) alignment, the completions request DRPO serves base models with."""
        return self.rewrite([body], Shape.CHAT)[0][0]

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The whole text prompt for a completion LLM (a base model): the user's prompt rewritten,
        then DRPO's prompt, the retrieved examples and the query, as DRPO's ``auto_model.py`` lays them out."""
        return self.render_batch([messages])[0]

    def render_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
        return [str(body["prompt"]) for body, _ in self._text_edge.rewrite(_bodies(conversations), Shape.CHAT)]

    async def arender_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
        return [str(body["prompt"]) for body, _ in await self._text_edge.arewrite(_bodies(conversations), Shape.CHAT)]

    @property
    def _text_edge(self) -> IntegrationRewriter:
        if self._text is None:
            raise ValueError("rendering a text prompt needs a DRPO alignment")
        return self._text


def _bodies(conversations: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"messages": list(messages)} for messages in conversations]


def _aligned(body: dict[str, Any], outcome: RequestOutcome) -> Aligned:
    return Aligned(body["messages"], outcome.result)
