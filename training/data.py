"""Training data: readers for every layout users have, and the (prompt -> optimized prompt) pair type."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import UsageError, read_rows

__all__ = ["Pair", "Triplet", "eval_prompts", "normalise", "read_pairs", "read_rows", "read_triplets"]


@dataclass(frozen=True)
class Pair:
    """One SFT example, in THUDM/BPO's schema when written out."""

    prompt: str
    optimized: str
    good_res: str = ""
    bad_res: str = ""
    context: str | None = None
    source: str = ""

    def to_bpo(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "optimized_prompt": self.optimized, "good_res": self.good_res, "bad_res": self.bad_res}
        if self.context:
            row["context"] = self.context
        return row


@dataclass(frozen=True)
class Triplet:
    """A preference example: a prompt, a better and a worse response."""

    prompt: str
    chosen: str
    rejected: str
    context: str | None = None
    source: str = ""

    @property
    def key(self) -> str:
        return normalise(self.prompt + "\x00" + (self.context or ""))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _pair(row: dict[str, Any], source: str) -> Pair | None:
    # THUDM/BPO: prompt / optimized_prompt; SFT exports of it: instruction / output.
    prompt = row.get("prompt", row.get("instruction"))
    optimized = row.get("optimized_prompt", row.get("output"))
    if not isinstance(prompt, str) or not isinstance(optimized, str) or not prompt.strip() or not optimized.strip():
        return None
    return Pair(prompt, optimized, str(row.get("good_res", "")), str(row.get("bad_res", "")), row.get("context") or None, source)


def eval_prompts(paths: Iterable[str | Path]) -> set[str]:
    """Normalised prompts of eval sets (Dolly, Self-Instruct, Vicuna) that must stay out of training."""
    keys: set[str] = set()
    for path in paths:
        for row in read_rows(path):
            for field in ("instruction", "text", "prompt", "question"):
                if isinstance(row.get(field), str):
                    keys.add(normalise(row[field]))
    return keys


def read_pairs(paths: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> list[Pair]:
    banned = eval_prompts(exclude)
    pairs = []
    for path in paths:
        for row in read_rows(path):
            pair = _pair(row, Path(path).name)
            if pair is not None and normalise(pair.prompt) not in banned:
                pairs.append(pair)
    if not pairs:
        raise UsageError(f"no (prompt, optimized_prompt) pairs in {', '.join(map(str, paths))}")
    return pairs


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_split(transcript: str) -> tuple[str, str] | None:
    """(prompt, final response) of a single-turn HH-RLHF transcript; None for multi-turn ones."""
    parts = _HH_TURN.split("\n\n" + transcript.strip("\n") if not transcript.startswith("\n\n") else transcript)
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if len(turns) != 2 or turns[0][0] != "Human" or turns[1][0] != "Assistant":
        return None
    return turns[0][1], turns[1][1]


def read_triplets(path: str | Path) -> list[Triplet]:
    """Preference data: BPO rows (good_res/bad_res), generic {prompt, context?, chosen, rejected}, or HH-RLHF."""
    triplets = []
    for row in read_rows(path):
        source = Path(path).name
        if isinstance(row.get("good_res"), str) and isinstance(row.get("bad_res"), str) and isinstance(row.get("prompt"), str):
            triplets.append(Triplet(row["prompt"], row["good_res"], row["bad_res"], row.get("context") or None, source))
        elif isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            if isinstance(row.get("prompt"), str):
                triplets.append(Triplet(row["prompt"], row["chosen"], row["rejected"], row.get("context") or None, source))
            else:
                chosen, rejected = _hh_split(row["chosen"]), _hh_split(row["rejected"])
                if chosen and rejected and chosen[0] == rejected[0] and chosen[1] != rejected[1]:
                    triplets.append(Triplet(chosen[0], chosen[1], rejected[1], None, source))
    return triplets
