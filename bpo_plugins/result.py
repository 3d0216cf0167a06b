"""The value types every part of bpo-plugins exchanges: results, fallback reasons, errors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal

__all__ = ["MODES", "FallbackReason", "GuardPreset", "Mode", "ModelLoadError", "RewriteError", "RewriteResult"]

Mode = Literal["greedy", "stable", "aggressive"]
MODES: tuple[Mode, ...] = ("greedy", "stable", "aggressive")
#: Which guards judged a result: ``GuardConfig()``, ``GuardConfig.strict()`` (what the bundled models get
#: unless told otherwise), or any other configuration.
GuardPreset = Literal["default", "strict", "custom"]


class FallbackReason(str, Enum):
    """Why a rewrite was not used and the original prompt was passed on instead.

    It is a ``str`` subclass, so ``result.fallback == "answered"`` works and the value
    serialises as plain text in JSON, run metadata and SQLite.
    """

    EMPTY_INPUT = "empty_input"
    INPUT_TOO_LONG = "input_too_long"
    TIMEOUT = "timeout"
    BACKEND_ERROR = "backend_error"
    EMPTY_OUTPUT = "empty_output"
    DEGENERATE = "degenerate"
    LENGTH_RATIO = "length_ratio"
    ANSWERED = "answered"
    LOST_TERMS = "lost_terms"
    PROTECTED_SPAN_LOST = "protected_span_lost"
    #: The text the instruction works on (quoted text, code, the data after it, list items) is gone.
    PAYLOAD_LOST = "payload_lost"
    #: A number of the prompt is missing from the rewrite.
    NUMBERS_LOST = "numbers_lost"
    #: A length, count, format, audience or language the user asked for is dropped or contradicted
    #: (:mod:`bpo_plugins.constraints`).
    CONSTRAINT_LOST = "constraint_lost"
    #: A name of the prompt is missing from the rewrite.
    ENTITIES_LOST = "entities_lost"
    #: The rewrite names people, places or things the prompt does not mention.
    ENTITIES_INVENTED = "entities_invented"
    #: The rewrite's meaning moved away from the prompt's (sentence-embedding cosine below the bar).
    MEANING_DRIFT = "meaning_drift"
    #: The prompt is mostly not English and the optimizer was trained on English only (BPO): passed
    #: through before any generation.
    NON_ENGLISH = "non_english"

    def __str__(self) -> str:
        return self.value

    @property
    def transient(self) -> bool:
        """True for failures that may not repeat, so their results must not be cached."""
        return self in (FallbackReason.TIMEOUT, FallbackReason.BACKEND_ERROR)


@dataclass(frozen=True)
class RewriteResult:
    """The outcome of one rewrite.

    ``rewritten`` is always safe to send on: it is the optimizer's rewrite when every guard
    passed, else the original prompt, with ``fallback`` naming the reason.
    """

    original: str
    rewritten: str
    mode: Mode
    backend: str
    latency_s: float = 0.0
    fallback: FallbackReason | None = None
    detail: str | None = None
    candidates: tuple[str, ...] = ()
    context: str | None = None
    cached: bool = False
    model: str = ""
    output_tokens: int = 0
    #: Candidates the backend stopped and cut where they started repeating themselves.
    loops_cut: int = 0
    #: The guards that judged this result (see :data:`GuardPreset`).
    guard_preset: GuardPreset = "default"

    @property
    def changed(self) -> bool:
        return self.fallback is None and self.rewritten != self.original

    @property
    def prompt(self) -> str:
        """The text to send to the target LLM: the rewritten instruction, then the context verbatim."""
        if self.context is None:
            return self.rewritten
        return f"{self.rewritten}\n\n{self.context}"

    def with_(self, **changes: object) -> RewriteResult:
        return replace(self, **changes)  # type: ignore[arg-type]

    #: What a rewrite cache keeps of a result: what the optimizer said and the guards decided, not
    #: who asked (prompt, context, latency) or which backend answered.
    RECORD_FIELDS = ("rewritten", "fallback", "detail", "candidates", "output_tokens", "loops_cut")

    def to_record(self) -> dict[str, object]:
        """This result as a cache record (:data:`RECORD_FIELDS`, as JSON values)."""
        record = self.to_dict()
        return {name: record[name] for name in self.RECORD_FIELDS}

    @staticmethod
    def from_record(record: dict[str, object]) -> dict[str, object]:
        """A cache record as result fields (``cached=True``), for a result of the prompt that hit it."""
        fallback = record.get("fallback")
        return {
            "rewritten": record["rewritten"],
            "fallback": None if fallback is None else FallbackReason(fallback),
            "detail": record.get("detail"),
            "candidates": tuple(record.get("candidates", ())),  # type: ignore[arg-type]
            "output_tokens": int(record.get("output_tokens", 0)),  # type: ignore[arg-type]
            "loops_cut": int(record.get("loops_cut", 0)),  # type: ignore[arg-type]
            "cached": True,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "original": self.original,
            "rewritten": self.rewritten,
            "context": self.context,
            "mode": self.mode,
            "backend": self.backend,
            "model": self.model,
            "fallback": None if self.fallback is None else self.fallback.value,
            "detail": self.detail,
            "candidates": list(self.candidates),
            "latency_s": round(self.latency_s, 6),
            "cached": self.cached,
            "output_tokens": self.output_tokens,
            "loops_cut": self.loops_cut,
            "guard_preset": self.guard_preset,
        }


class RewriteError(RuntimeError):
    """Raised instead of falling back when a :class:`~bpo_plugins.Rewriter` is ``strict``."""

    def __init__(self, reason: FallbackReason, detail: str | None, result: RewriteResult) -> None:
        super().__init__(f"rewrite failed ({reason.value}): {detail or 'no detail'}")
        self.reason = reason
        self.detail = detail
        self.result = result


class ModelLoadError(RuntimeError):
    """A model, registry entry or export folder could not be loaded; the message says how to fix it."""
