"""Protected spans: ``<keep>...</keep>`` and each string a caller protects are swapped for
placeholders the optimizer must copy, then put back byte-identical (:class:`Masked`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["KEEP_TAG", "Masked", "check_text", "mask_protected", "placeholder_pattern"]

KEEP_TAG = re.compile(r"<keep>(.*?)</keep>", re.DOTALL)


def check_text(value: object, name: str = "prompt") -> str:
    """Reject what is not text with an error that says what to pass instead."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be str, not {type(value).__name__}: decode it first, e.g. data.decode('utf-8')")
    raise TypeError(f"{name} must be str, not {type(value).__name__}")


def placeholder_pattern(tag: str) -> re.Pattern[str]:
    """A protected span's placeholder, ``{{TAG_n}}``; group 1 is n."""
    return re.compile(r"\{\{" + tag + r"_(\d+)\}\}")


def _placeholder(tag: str, n: int | str) -> str:
    return f"{{{{{tag}_{n}}}}}"



@dataclass(frozen=True)
class Masked:
    """A prompt with its protected spans swapped for placeholders the optimizer must copy."""

    text: str  # what the optimizer sees
    plain: str  # the prompt with <keep> tags removed: what a fallback passes on
    spans: tuple[str, ...]
    tag: str = "KEEP"

    @property
    def without_placeholders(self) -> str:
        """What the optimizer sees, each placeholder a space (for checks that read the prompt's words)."""
        return placeholder_pattern(self.tag).sub(" ", self.text)

    def restore(self, output: str) -> str | None:
        """Put the spans back byte-identical; None when the optimizer lost or invented a placeholder."""
        if not self.spans:
            return output
        pattern = placeholder_pattern(self.tag)
        seen = {int(m) for m in pattern.findall(output)}
        if seen != set(range(len(self.spans))):
            return None
        return pattern.sub(lambda m: self.spans[int(m.group(1))], output)


def mask_protected(prompt: str, protect: Sequence[str] = ()) -> Masked:
    """Replace ``<keep>…</keep>`` spans and each string in ``protect`` with placeholders."""
    spans: list[str] = []
    tag = "KEEP"
    while "{{" + tag in prompt or any("{{" + tag in span for span in protect if isinstance(span, str)):
        tag += "X"  # the user's own text holds our placeholder syntax: pick one it cannot contain

    def placeholder(span: str) -> str:
        spans.append(span)
        return _placeholder(tag, len(spans) - 1)

    plain = KEEP_TAG.sub(lambda m: m.group(1), prompt)
    text = KEEP_TAG.sub(lambda m: placeholder(m.group(1)), prompt)
    for span in protect:
        check_text(span, "protected span")
        if not span:
            continue
        # Replace only outside placeholders already made, so a span like "0" cannot break one.
        pieces = placeholder_pattern(tag).split(text)  # text, n, text, n, ..., text
        if any(span in piece for piece in pieces[::2]):
            marker = placeholder(span)
            pieces[::2] = [piece.replace(span, marker) for piece in pieces[::2]]
            pieces[1::2] = [_placeholder(tag, n) for n in pieces[1::2]]
            text = "".join(pieces)
    return Masked(text=text, plain=plain, spans=tuple(spans), tag=tag)
