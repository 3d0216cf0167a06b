"""What every layer labels a request with: its :class:`Shape` and the :class:`RequestOutcome` of
rewriting it. A leaf: the request rewriter, DRPO's request recipe, telemetry, the gateway and the
framework edges all import it, and it imports nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from bpo_plugins.result import RewriteResult

__all__ = ["RequestOutcome", "Shape"]


class Shape(str, Enum):
    """The request formats the rewriter reads."""

    CHAT = "chat"
    RESPONSES = "responses"
    COMPLETIONS = "completions"
    #: Anthropic's Messages API.
    MESSAGES = "messages"


@dataclass
class RequestOutcome:
    """What was done to one request: for the ``X-BPO-Rewrite`` header, metrics and traces."""

    status: str  # applied | unchanged | off | fallback | skipped
    reason: str | None = None
    #: BPO's result (None when no rewrite was tried).
    result: RewriteResult | None = None
    #: Seconds spent rewriting (0 when no rewrite was tried).
    rewrite_s: float = 0.0
    #: True when a DRPO alignment was applied.
    aligned: bool = False
    #: The shape of the returned body when it differs from the request's (a raw DRPO preset turns a
    #: chat request into a completions request); None when unchanged.
    upstream_shape: Shape | None = None

    @classmethod
    def of(cls, result: RewriteResult, seconds: float = 0.0) -> RequestOutcome:
        """The outcome of a finished rewrite: fallback (with its reason), applied or unchanged."""
        if result.fallback is not None:
            return cls("fallback", result.fallback.value, result, seconds)
        return cls("applied" if result.changed else "unchanged", None, result, seconds)

    @property
    def header(self) -> str:
        """The ``X-BPO-Rewrite`` value: the status and a reason, never prompt text."""
        return self.status if self.reason is None else f"{self.status}; reason={self.reason}"

    @property
    def cache(self) -> str:
        """``hit`` or ``miss`` for a greedy rewrite (the only cached mode), else ``off``."""
        if self.result is None or self.result.mode != "greedy":
            return "off"
        return "hit" if self.result.cached else "miss"

    @property
    def changed(self) -> bool:
        """True when the body differs from the request's."""
        return self.status == "applied" or self.aligned
