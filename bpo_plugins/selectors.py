"""Pick one rewrite among aggressive-mode candidates. Any ``(original, candidates) -> index`` works.

BPO's reference prints its 5 aggressive samples and picks none; a Rewriter returns one prompt, so it
needs a rule. ``consensus`` (the default) is our addition; ``first`` takes the first sample that passes
the guards, which is what running the reference once would give.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["SELECTORS", "Selector", "select_consensus", "select_first", "select_longest"]

Selector = Callable[[str, Sequence[str]], int]


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def select_consensus(original: str, candidates: Sequence[str]) -> int:
    """The medoid: the candidate most like the others (word-set Jaccard), as in self-consistency.

    Samples at temperature 0.9 scatter; the one the others agree with is the least likely outlier.
    """
    if len(candidates) <= 2:
        return select_longest(original, candidates)
    sets = [_words(c) for c in candidates]

    def agreement(i: int) -> float:
        return sum(len(sets[i] & s) / max(len(sets[i] | s), 1) for j, s in enumerate(sets) if j != i)

    return max(range(len(candidates)), key=lambda i: (agreement(i), len(candidates[i])))


def select_longest(original: str, candidates: Sequence[str]) -> int:
    """The most detailed candidate: BPO's rewrites gain by adding specifics."""
    return max(range(len(candidates)), key=lambda i: len(candidates[i]))


def select_first(original: str, candidates: Sequence[str]) -> int:
    return 0


SELECTORS: dict[str, Selector] = {
    "consensus": select_consensus,
    "longest": select_longest,
    "first": select_first,
}
