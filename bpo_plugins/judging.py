"""Deciding what may replace a prompt, with no model or Rewriter in sight: which inputs pass through
without a generation, which candidates pass the guards, and the one chosen.

:class:`~bpo_plugins.Rewriter` runs these on every path (local, HTTP, ``check`` for outputs generated
elsewhere); each is testable on its own, on plain strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bpo_plugins.cleanup import clean_output
from bpo_plugins.guards import GuardConfig, check_rewrite, word_count
from bpo_plugins.language import non_english_reason
from bpo_plugins.masking import Masked, check_text
from bpo_plugins.result import FallbackReason
from bpo_plugins.selectors import Selector

__all__ = ["Verdict", "checked_inputs", "judge_candidates", "keep_intent", "pass_through_reason"]

Failure = tuple[FallbackReason, str]


def checked_inputs(
    prompts: Sequence[str], contexts: Sequence[str | None] | None, protect: Sequence[str]
) -> tuple[list[str], list[str | None] | None]:
    """The prompts and contexts as lists of text; a TypeError or ValueError that names what to pass instead."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("rewrite_batch takes a list of prompts; use rewrite() for one prompt")
    checked = [check_text(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if contexts is not None:
        if isinstance(contexts, (str, bytes)) or len(contexts) != len(checked):
            raise ValueError("contexts must be a list with one entry (or None) per prompt")
        contexts = [None if c is None else check_text(c, "context") for c in contexts]
    if isinstance(protect, (str, bytes)):
        raise TypeError("protect takes a list of strings, not a single string")
    return checked, None if contexts is None else list(contexts)


def pass_through_reason(masked: Masked, max_input_words: int, english_only: bool) -> Failure | None:
    """Why a prompt goes through unchanged without a generation: empty, too long, or not English."""
    words = word_count(masked.plain)
    if not masked.plain.strip():
        return FallbackReason.EMPTY_INPUT, "nothing to rewrite"
    if words > max_input_words:
        # Long inputs are where BPO damages text (it rewrites passages): pass them through.
        return FallbackReason.INPUT_TOO_LONG, f"{words} words > max_input_words={max_input_words}"
    # Judged on what the optimizer would see: protected spans (a passage, options) are not its to read.
    why = non_english_reason(masked.without_placeholders)
    if why is not None and english_only:
        return FallbackReason.NON_ENGLISH, why
    return None


@dataclass(frozen=True)
class Verdict:
    """The candidates as cleaned, and the chosen rewrite (protected spans restored) or why none passed."""

    candidates: tuple[str, ...]
    chosen: str | None
    failure: Failure | None


def judge_candidates(masked: Masked, texts: Sequence[str], guards: GuardConfig, selector: Selector) -> Verdict:
    """Clean each generated text, restore its protected spans, run the guards (the intent check, the
    one that loads a model, last), and pick one of those that pass; else the first failure."""
    candidates = tuple(clean_output(t) for t in texts)
    valid: list[str] = []
    first_failure: Failure | None = None
    for candidate in candidates:
        restored = masked.restore(candidate)
        failure = (
            (FallbackReason.PROTECTED_SPAN_LOST, "the optimizer dropped or invented a protected-span placeholder")
            if restored is None
            else check_rewrite(masked.plain, restored, guards)
        )
        if failure is None and restored is not None:
            valid.append(restored)
        elif first_failure is None:
            first_failure = failure
    if valid and guards.min_intent_cosine > 0:
        valid, drift = keep_intent(masked.plain, valid, guards.min_intent_cosine)
        first_failure = first_failure or drift
    if not valid:
        assert first_failure is not None
        return Verdict(candidates, None, first_failure)
    chosen = valid[selector(masked.plain, valid)] if len(valid) > 1 else valid[0]
    return Verdict(candidates, chosen, None)


def keep_intent(prompt: str, candidates: list[str], bar: float) -> tuple[list[str], Failure | None]:
    """The candidates whose MiniLM cosine with the prompt clears ``bar`` (one forward pass)."""
    from bpo_plugins.embeddings import shared_embedder

    sims = shared_embedder().cosine(candidates, [prompt] * len(candidates))
    kept = [c for c, sim in zip(candidates, sims) if sim >= bar]
    return kept, None if kept else (FallbackReason.MEANING_DRIFT, f"intent cosine {max(sims):.2f} is below {bar}")
