"""The complement design (issue 30; PAS, Zheng et al. 2024): a rewrite is the user's prompt, untouched,
followed by what the reference rewrite adds to it.

BPO's rewrites restate the prompt and add requirements. A 135M optimizer trained on a few hundred of them
learns the restating (paraphrase, and with it the risk of drift) far better than the adding. The complement
pair keeps only the adding: the prompt goes through verbatim, so its meaning is kept by construction, and
the target is the prompt plus the reference's sentences that say something the prompt does not.

A sentence of the reference counts as added when fewer than half of its content words (``content_terms``:
stemmed, no function words) occur in the prompt. On the 60 held-out pairs, "prompt + additions" keeps much of
what the full reference rewrites gain (likelihood net +16 against +29; answer margin +11 against +6;
``training/results/v2/heldout-bounds.md``). Trained on BPO's 95 training pairs that add a sentence, a 135M
optimizer does not yet reach it (``training/results/v2/README.md``).
"""

from __future__ import annotations

import re
from dataclasses import replace

from bpo_plugins.guards import content_terms
from bpo_plugins.training.data import Pair

__all__ = ["ADDED_SENTENCE_OVERLAP", "additions", "complement"]

#: A reference sentence with at most this share of its content words in the prompt is new content.
ADDED_SENTENCE_OVERLAP = 0.5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def additions(prompt: str, optimized: str, overlap: float = ADDED_SENTENCE_OVERLAP) -> str:
    """The sentences of ``optimized`` that add to ``prompt``, joined by a space ("" when it only restates)."""
    prompt_terms = content_terms(prompt)
    added = []
    for sentence in _SENTENCE_END.split(optimized):
        terms = content_terms(sentence)
        if terms and len(terms & prompt_terms) / len(terms) < overlap:
            added.append(sentence.strip())
    return " ".join(added)


def complement(pair: Pair, overlap: float = ADDED_SENTENCE_OVERLAP) -> Pair:
    """``pair`` with its target replaced by the untouched prompt plus the reference's additions; the prompt
    alone (a keep-as-is row) when the reference only restates it."""
    added = additions(pair.prompt, pair.optimized, overlap)
    return replace(pair, optimized=pair.prompt.rstrip() + (" " + added if added else ""))
