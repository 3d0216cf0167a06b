"""Decoding settings for each rewrite mode, shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from bpo_plugins.cleanup import BANNED_MARKERS
from bpo_plugins.result import MODES, Mode

__all__ = [
    "AGGRESSIVE_MIN_OVER_PROMPT", "AGGRESSIVE_TEMPERATURE", "AGGRESSIVE_TOP_P", "LOOP_MAX_PERIOD", "LOOP_MIN_TOKENS",
    "REFERENCE_MAX_NEW_TOKENS", "STABLE_TEMPERATURE", "STABLE_TOP_P", "Decoding", "check_mode", "cut_at_newline", "cut_at_stop",
    "decoding_for", "fit_minimum", "loop_cut",
]

#: BPO's aggressive mode (thu-coai/BPO ``src/infer_example.py``): 5 samples at T 0.9, top_p 0.9.
AGGRESSIVE_TEMPERATURE = 0.9
AGGRESSIVE_TOP_P = 0.9
#: ... each at least the prompt's token count + 5 new tokens long (``min_length``; see
#: :meth:`~bpo_plugins.backends.local.LocalBackend.min_new_tokens` for how the reference counts).
AGGRESSIVE_MIN_OVER_PROMPT = 5
#: The reference's token budget (``max_new_tokens=1024`` in both modes): a minimum length may raise a
#: smaller cap up to it (:func:`fit_minimum`).
REFERENCE_MAX_NEW_TOKENS = 1024
#: BPO's stable mode: one sample at T 0.6, top_p 0.9.
STABLE_TEMPERATURE = 0.6
STABLE_TOP_P = 0.9


@dataclass(frozen=True)
class Decoding:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_candidates: int = 1
    max_new_tokens: int = 256
    banned_words: tuple[str, ...] = ()
    #: Stop a row whose tail starts repeating and cut the repeats (see :func:`loop_cut`). On for
    #: rewrites (the Rewriter's ``stop_loops``), off for answers, which may repeat on purpose.
    stop_loops: bool = False
    #: Strings that end a generation (DRPO's ``<END>``): every backend stops there and leaves them out.
    stop: tuple[str, ...] = ()
    #: End each generation at its first newline (BPO's aggressive ``eos_token_id=[eos, 13]``): local
    #: runtimes stop on every newline token of the model's vocabulary, servers get ``stop: ["\n"]``,
    #: and the Rewriter cuts whatever a server sent past a newline.
    stop_at_newline: bool = False
    #: Each generation is at least (the user prompt's token count + this) new tokens long, its
    #: end-of-sequence and newline tokens held back until then (BPO's aggressive ``min_length``).
    #: None: no minimum. Local runtimes count with the model's tokenizer; servers get ``min_tokens``.
    min_tokens_over_prompt: int | None = None
    #: A sampling seed for servers that take one (OpenAI's ``seed``; DRPO's client sends 0 on every
    #: call). None: no seed is sent; local runtimes ignore it.
    seed: int | None = None

    def as_key(self) -> dict[str, object]:
        key = asdict(self)
        if self.seed is None:
            del key["seed"]  # keys of requests without a seed stay as they were
        return key

    def capped(self, max_new_tokens: int) -> Decoding:
        return replace(self, max_new_tokens=max(1, min(self.max_new_tokens, max_new_tokens)))


def fit_minimum(decoding: Decoding, min_new: Sequence[int]) -> tuple[Decoding, list[int]]:
    """``decoding`` with a cap that leaves room after each row's minimum length, and the minimums that fit it.

    BPO's aggressive minimum (the prompt's tokens + 5) always fits the reference's 1,024-token budget,
    but not our smaller cap (``max_new_tokens``, the length budget) once a prompt is long: a local
    runtime then holds EOS and newline back until the cap, so every sample stops mid-sentence, and
    vLLM refuses ``min_tokens > max_tokens`` with a 400. So a minimum raises the cap to twice itself
    (as much room after it as before), never past the reference's budget; a minimum past that budget
    is cut to the cap, as ``generate`` treats a ``min_length`` it cannot reach.
    """
    if not min_new:
        return decoding, []
    cap = max(decoding.max_new_tokens, min(REFERENCE_MAX_NEW_TOKENS, 2 * max(min_new)))
    return replace(decoding, max_new_tokens=cap), [min(floor, cap) for floor in min_new]


def cut_at_newline(text: str) -> str:
    """A newline-stopped generation up to its first line break (leading line breaks skipped: a server
    that got ``min_tokens`` may have written one before it was allowed to stop)."""
    return text.lstrip("\r\n").split("\n", 1)[0].rstrip("\r")


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` it contains (what servers return for a stop sequence)."""
    at = min((text.index(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:at]


#: A tail repeating with period p is a loop once it covers max(LOOP_MIN_TOKENS, 2p) tokens: short
#: enough to stop a "Mondegreen:\nMondegreen:\n..." loop within ~0.2 s, long enough that a
#: markdown rule or a short list of repeated words does not trip it.
LOOP_MIN_TOKENS = 24
LOOP_MAX_PERIOD = 64


def loop_cut(tokens: Sequence[int], prompt: Sequence[int] = ()) -> int | None:
    """Where to cut a generation whose tail has fallen into a loop, keeping one copy; None if it has not.

    Optimizers under 2B parameters loop (thu-coai/BPO#16): left alone they repeat a line until
    ``max_new_tokens``, which costs the whole token budget and ends in a fallback. Backends check
    each row as it grows and stop it here. A repeating span that the prompt itself contains is
    a faithful copy (a table, a data sample), not a loop.
    """
    n = len(tokens)
    for period in range(1, min(LOOP_MAX_PERIOD, n // 2) + 1):
        span = max(LOOP_MIN_TOKENS, 2 * period)
        if span > n or tokens[-1] != tokens[-1 - period]:
            continue
        if any(tokens[i] != tokens[i - period] for i in range(n - span + period, n - 1)):
            continue
        if _contains(prompt, tokens[n - span :]):
            return None  # every longer period is a multiple of this one, and copies the prompt too
        start = n - span
        while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
            start -= 1
        return start + period
    return None


def _contains(haystack: Sequence[int], needle: Sequence[int]) -> bool:
    if len(needle) > len(haystack):
        return False
    # Token ids as comma-separated text: a C-speed substring search instead of a Python scan.
    return "," + ",".join(map(str, needle)) + "," in "," + ",".join(map(str, haystack)) + ","


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def decoding_for(
    mode: str, *, max_new_tokens: int, num_candidates: int = 5, stop_loops: bool = True, bpo_recipe: bool = True
) -> Decoding:
    """BPO's settings (thu-coai/BPO src/infer_example.py) for ``stable`` and ``aggressive``.

    Aggressive mode is 5 samples at T 0.9 and top_p 0.9. With ``bpo_recipe`` (an optimizer trained
    on BPO's data: its checkpoint, or BPO's instruction) BPO's marker words are banned and each
    sample also stops at a newline and runs at least the prompt's token count + 5 tokens, as the
    reference does; a general LLM acting as prompt engineer writes multi-line prompts, which a
    newline stop would cut to their first line, so it gets the sampling settings only.
    """
    mode = check_mode(mode)
    if mode == "greedy":
        return Decoding(max_new_tokens=max_new_tokens, stop_loops=stop_loops)
    if mode == "stable":
        return Decoding(do_sample=True, temperature=STABLE_TEMPERATURE, top_p=STABLE_TOP_P, max_new_tokens=max_new_tokens,
                        stop_loops=stop_loops)
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    return Decoding(
        do_sample=True,
        temperature=AGGRESSIVE_TEMPERATURE,
        top_p=AGGRESSIVE_TOP_P,
        num_candidates=num_candidates,
        max_new_tokens=max_new_tokens,
        banned_words=BANNED_MARKERS if bpo_recipe else (),  # a general LLM does not write BPO's training markers
        stop_loops=stop_loops,
        stop_at_newline=bpo_recipe,
        min_tokens_over_prompt=AGGRESSIVE_MIN_OVER_PROMPT if bpo_recipe else None,
    )
