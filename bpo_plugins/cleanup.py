"""What optimizers wrap around a rewrite, taken off: labels, quotes, chat markers and BPO's marker words."""

from __future__ import annotations

import re

__all__ = ["BANNED_MARKERS", "CUT_MARKERS", "clean_output", "has_marker"]

# BPO's aggressive mode bans these marker words and cuts outputs at their prefixes
# (thu-coai/BPO src/infer_example.py); the chat-format tokens leak from small models.
BANNED_MARKERS: tuple[str, ...] = ("[PROTECT]", "\n\n[PROTECT]", "[KEEP", "[INSTRUCTION]")
#: Where an output is cut at runtime, and what drops a teacher's rewrite from the training data
#: (:func:`has_marker`): one list, so what training keeps out is what serving cuts off.
CUT_MARKERS: tuple[str, ...] = ("[KE", "[INS", "[PRO", "[/INST", "</s>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "[END]")


def has_marker(text: str) -> bool:
    """True when ``text`` holds a marker (:data:`CUT_MARKERS`, in any case) that runtime would cut at."""
    lowered = text.lower()
    return any(marker.lower() in lowered for marker in CUT_MARKERS)


_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:here(?:'s| is) (?:the |an |my )?)?(?:improved|optimi[sz]ed|rewritten|revised|refined|enhanced|better|new)"
    r"\s+(?:prompt|instruction|version|query)(?: is)?(?:\*\*)?\s*[:：]\s*(?:\*\*)?",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "«": "»", "`": "`"}


def clean_output(text: str) -> str:
    """Strip what optimizers wrap around a rewrite: labels, quotes, chat markers, BPO markers."""
    cut = len(text)
    for marker in CUT_MARKERS:
        at = text.find(marker)
        if at != -1:
            cut = min(cut, at)
    text = text[:cut].strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]):
        inner = text[1:-1].strip()
        if _QUOTES[text[0]] not in inner:
            text = inner
    return _strip_unmatched_quote(text)


def _strip_unmatched_quote(text: str) -> str:
    """A quote mark that opens or closes the whole rewrite with no partner (small models write
    ``"Tell me about X. What is...``): dropped. Apostrophes inside words are not quote marks."""
    for open_, close in (('"', '"'), ("“", "”"), ("«", "»")):
        if open_ == close:
            if text.count(open_) % 2 == 1:  # an odd count: one straight quote has no partner
                if text.startswith(open_):
                    text = text[1:].lstrip()
                elif text.endswith(open_):
                    text = text[:-1].rstrip()
            continue
        if text.startswith(open_) and close not in text:
            text = text[1:].lstrip()
        if text.endswith(close) and open_ not in text:
            text = text[:-1].rstrip()
    if text.startswith("'") and not re.search(r"\w'(?!\w)", text[1:]):  # no quote closes after a word
        text = text[1:].lstrip()
    return text
