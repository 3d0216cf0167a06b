"""The backend contract: turn rendered optimizer inputs into text. Nothing else.

Modes, guards, cache and batching policy live in :class:`bpo_plugins.Rewriter`; a backend
only runs one generation call for a batch of prompts and reports what came out.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from bpo_plugins.decoding import Decoding
from bpo_plugins.templates import PromptTemplate

__all__ = ["Backend", "BatchOutput", "Generation", "usable_cores"]

@dataclass
class Generation:
    """The candidates for one prompt of a batch."""

    texts: list[str]
    output_tokens: int = 0
    #: Prompt tokens, where the runtime reports them (HTTP APIs do); 0 where unknown.
    input_tokens: int = 0
    #: How many of ``texts`` were stopped and cut where they fell into a loop (:func:`~bpo_plugins.decoding.loop_cut`).
    loops_cut: int = 0


@dataclass
class BatchOutput:
    generations: list[Generation]
    timed_out: bool = False
    stats: dict[str, float] = field(default_factory=dict)


class Backend(ABC):
    #: Short backend name reported on every result ("transformers", "openai", ...).
    name: str = "backend"
    #: Model identity for cache keys and reports.
    model_id: str = ""
    revision: str = ""
    #: The template this model was trained with, used when the Rewriter is given none.
    default_template: PromptTemplate
    #: Prompts/s of one batch-8 call over one batch-1 call, as measured on a 2-core CPU
    #: (``benchmarks/runtimes.py``). Callers that could gather prompts (the gateway's micro-batcher,
    #: ``bpo optimize --file``) batch only where this is well above 1.
    batch_speedup: float = 1.0

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        """Generate ``decoding.num_candidates`` texts for each prompt in one batched call."""

    async def agenerate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        # Local backends compute on CPU/GPU: run them off the event loop so other coroutines go on.
        return await asyncio.to_thread(self.generate, prompts, template, decoding, timeout_s)

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "model": self.model_id, "revision": self.revision}


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)
