"""BPO and DRPO in one step: BPO rewrites the user's prompt, DRPO frames it with an aligned system
prompt and retrieved examples. Every integration's BPO+DRPO line is this object.

    from bpo_plugins.pipeline import AlignmentPipeline
    pipeline = AlignmentPipeline("llama3-8b-instruct")            # a DRPO preset or artifact, plus bpo-small
    messages = pipeline.apply([{"role": "user", "content": "tips for a job interview"}])

Examples are retrieved for the user's own words, not the rewrite: the rewrite adds detail that
would pull retrieval away from the intent. A rewrite that fails falls back to the original
(``fail_open``), and the alignment is applied either way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bpo_plugins.chat import last_user_prompt
from bpo_plugins.result import Mode, RewriteResult
from bpo_plugins.rewriter import Rewriter

Messages = list[dict[str, Any]]


@dataclass
class Aligned:
    messages: Messages
    #: BPO's result for the last user message (None: BPO off, or no user text to rewrite).
    rewrite: RewriteResult | None


class AlignmentPipeline:
    """``alignment``: a DRPO preset name, an artifact path or an :class:`~bpo_plugins.drpo.Alignment`
    (None: BPO only). ``rewriter``: the BPO optimizer (default ``bpo-small``); ``bpo=False``: DRPO only."""

    def __init__(self, alignment: Any = None, rewriter: Rewriter | None = None, *, bpo: bool = True,
                 mode: Mode = "greedy", fail_open: bool = True, k: int | None = None) -> None:
        if alignment is None and not bpo:
            raise ValueError("an AlignmentPipeline needs BPO, a DRPO alignment, or both")
        if isinstance(alignment, (str, Path)):
            from bpo_plugins.drpo import load_alignment

            alignment = load_alignment(alignment, k=k)
        elif alignment is not None and k is not None:
            alignment = replace(alignment, k=k)
        self.alignment = alignment
        self.bpo = bpo
        self._rewriter = rewriter
        self.mode: Mode = mode
        self.fail_open = fail_open

    @property
    def rewriter(self) -> Rewriter:
        if self._rewriter is None:
            self._rewriter = Rewriter.default()
        return self._rewriter

    def align_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[Aligned]:
        found = self._prompts(conversations)
        texts = [prompt.text for _, prompt in found]
        results = self.rewriter.rewrite_batch(texts, mode=self.mode, strict=not self.fail_open) if self.bpo and texts else []
        return self._finish(conversations, found, results)

    async def aalign_batch(self, conversations: Sequence[Sequence[dict[str, Any]]]) -> list[Aligned]:
        found = self._prompts(conversations)
        texts = [prompt.text for _, prompt in found]
        results = await self.rewriter.arewrite_batch(texts, mode=self.mode, strict=not self.fail_open) if self.bpo and texts else []
        return self._finish(conversations, found, results)

    def apply(self, messages: Sequence[dict[str, Any]]) -> Messages:
        """An OpenAI-style message list, rewritten and aligned."""
        return self.align_batch([messages])[0].messages

    async def aapply(self, messages: Sequence[dict[str, Any]]) -> Messages:
        return (await self.aalign_batch([messages]))[0].messages

    def apply_to_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat request body: messages as :meth:`apply`, DRPO's stop strings added."""
        aligned = self.apply(body.get("messages") or [])
        if self.alignment is None:
            return {**body, "messages": aligned}
        return {**self.alignment.apply_to_request({**body, "messages": []}), "messages": aligned}

    # -- the two steps ----------------------------------------------------------------------------

    @staticmethod
    def _prompts(conversations: Sequence[Sequence[dict[str, Any]]]) -> list[tuple[int, Any]]:
        """(conversation index, its last user prompt) for every conversation that has one."""
        found = []
        for i, messages in enumerate(conversations):
            prompt = last_user_prompt(messages)
            if not isinstance(prompt, str):
                found.append((i, prompt))
        return found

    def _finish(self, conversations: Sequence[Sequence[dict[str, Any]]], found: list[tuple[int, Any]],
                results: Sequence[RewriteResult]) -> list[Aligned]:
        copies = [copy.deepcopy(list(messages)) for messages in conversations]  # the caller's lists stay as they were
        originals = {i: prompt.text for i, prompt in found}
        rewrites = dict(zip(originals, results))
        for i, result in rewrites.items():
            prompt = last_user_prompt(copies[i])
            assert not isinstance(prompt, str)  # the copy has the prompt its original had
            prompt.replace(result.rewritten)
        if self.alignment is None:
            return [Aligned(messages, rewrites.get(i)) for i, messages in enumerate(copies)]
        return [Aligned(self.alignment.apply(messages, query=originals.get(i)), rewrites.get(i)) for i, messages in enumerate(copies)]
