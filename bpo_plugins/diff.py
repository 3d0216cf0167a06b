"""A word-level diff of a prompt and its rewrite: what the playground page and ``bpo optimize`` on a
terminal both show. One function computes it (difflib); the page renders its ops, the terminal colours them."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["DiffOp", "diff_ops_json", "rich_diff", "word_diff"]

DiffTag = Literal["same", "removed", "added"]
# Each word with the whitespace after it (and any leading whitespace alone), so that joining the ops'
# texts gives back either side exactly, and a lone space never anchors a match between two new words.
_TOKENS = re.compile(r"\s+|\S+\s*")


@dataclass(frozen=True)
class DiffOp:
    """A run of text that both sides share (``same``), that only the original has (``removed``), or
    that only the rewrite has (``added``)."""

    tag: DiffTag
    text: str


def word_diff(before: str, after: str) -> list[DiffOp]:
    """The ops that turn ``before`` into ``after``, word by word. The ``same`` and ``removed`` texts
    joined give ``before``; ``same`` and ``added`` give ``after``."""
    old, new = _TOKENS.findall(before), _TOKENS.findall(after)
    # autojunk off: a prompt's common words ("the", spaces) must still anchor the match.
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    ops: list[DiffOp] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            _append(ops, "same", "".join(old[i1:i2]))
            continue
        if tag in ("delete", "replace"):
            _append(ops, "removed", "".join(old[i1:i2]))
        if tag in ("insert", "replace"):
            _append(ops, "added", "".join(new[j1:j2]))
    return ops


def _append(ops: list[DiffOp], tag: DiffTag, text: str) -> None:
    if not text:
        return
    if ops and ops[-1].tag == tag:
        ops[-1] = DiffOp(tag, ops[-1].text + text)
    else:
        ops.append(DiffOp(tag, text))


def diff_ops_json(ops: list[DiffOp]) -> list[dict[str, str]]:
    """The ops as the playground page receives them."""
    return [{"tag": op.tag, "text": op.text} for op in ops]


def rich_diff(ops: list[DiffOp]) -> Any:
    """The ops as a ``rich.text.Text``: removed words red and struck through, added words green."""
    from rich.text import Text

    styles = {"same": "", "removed": "red strike", "added": "green"}
    text = Text()
    for op in ops:
        text.append(op.text, style=styles[op.tag])
    return text
