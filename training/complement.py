"""The complement design (issue 30; PAS, Zheng et al. 2024): a rewrite is the user's prompt, untouched,
followed by what the reference rewrite adds to it.

BPO's rewrites restate the prompt and add requirements. A 135M optimizer trained on a few hundred of them
learns the restating (paraphrase, and with it the risk of drift) far better than the adding. The complement
pair keeps only the adding: the prompt goes through verbatim, so its meaning is kept by construction, and
the target is the prompt plus the reference's sentences that say something the prompt does not.

A sentence of the reference counts as added when fewer than half of its content words (``content_terms``:
stemmed, no function words) occur in the prompt. On the 60 held-out pairs, "prompt + additions" keeps much of
what the full reference rewrites gain (likelihood net +18 against +29; answer margin +9 against +6;
``training/results/v2/heldout-bounds.md``). Trained on BPO's 95 training pairs that add a sentence, a 135M
optimizer does not yet reach it (``training/results/v2/README.md``).
"""

from __future__ import annotations

from dataclasses import replace

from bpo_plugins.guards import content_terms, has_unspaced_script, sentences
from bpo_plugins.training.data import Pair

__all__ = ["ADDED_SENTENCE_OVERLAP", "additions", "complement"]

#: A reference sentence with less than this share of its content words in the prompt is new content.
ADDED_SENTENCE_OVERLAP = 0.5
_CLOSING = ".!?:;)\"'”’"


def additions(prompt: str, optimized: str, overlap: float = ADDED_SENTENCE_OVERLAP) -> str:
    """The sentences of ``optimized`` that add to ``prompt``: a line's kept sentences joined by a space, its
    lines by a line break ("" when it adds no new sentence, or for Chinese, Japanese or Korean text, whose
    words cannot be compared as sets)."""
    if has_unspaced_script(prompt) or has_unspaced_script(optimized):
        return ""
    prompt_terms = content_terms(prompt)
    lines = []
    for line in optimized.splitlines():
        added = [s for s in sentences(line) if (terms := content_terms(s)) and len(terms & prompt_terms) / len(terms) < overlap]
        if added:
            lines.append(" ".join(added))
    return "\n".join(lines)


def complement(pair: Pair, overlap: float = ADDED_SENTENCE_OVERLAP) -> Pair:
    """``pair`` with its target replaced by the untouched prompt plus the reference's additions; the prompt
    alone when the reference adds no new sentence. The additions follow a blank line where the prompt or
    they span lines (a prompt's data stays apart from them), else a space, after a period where the prompt
    has no closing punctuation."""
    added = additions(pair.prompt, pair.optimized, overlap)
    prompt = pair.prompt.rstrip()
    if not added:
        return replace(pair, optimized=prompt)
    if "\n" in prompt or "\n" in added:
        joined = f"{prompt}\n\n{added}"
    else:
        joined = f"{prompt}{'' if prompt[-1] in _CLOSING else '.'} {added}"
    return replace(pair, optimized=joined)
