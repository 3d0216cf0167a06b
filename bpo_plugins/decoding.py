"""Decoding settings for each rewrite mode, shared by every backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from bpo_plugins.guards import BANNED_MARKERS
from bpo_plugins.result import MODES, Mode


@dataclass(frozen=True)
class Decoding:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_candidates: int = 1
    max_new_tokens: int = 256
    banned_words: tuple[str, ...] = ()

    def as_key(self) -> dict[str, object]:
        return asdict(self)

    def capped(self, max_new_tokens: int) -> Decoding:
        return replace(self, max_new_tokens=max(1, min(self.max_new_tokens, max_new_tokens)))


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def decoding_for(mode: str, *, max_new_tokens: int, num_candidates: int = 5) -> Decoding:
    """BPO's settings (thu-coai/BPO src/infer_example.py) for ``stable`` and ``aggressive``."""
    mode = check_mode(mode)
    if mode == "greedy":
        return Decoding(max_new_tokens=max_new_tokens)
    if mode == "stable":
        return Decoding(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=max_new_tokens)
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    return Decoding(
        do_sample=True,
        temperature=0.9,
        top_p=1.0,
        num_candidates=num_candidates,
        max_new_tokens=max_new_tokens,
        banned_words=BANNED_MARKERS,
    )
