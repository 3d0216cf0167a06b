"""The paper's pairwise judge: FastChat's ``pair-v2`` prompt, asked in both orders, read as win, tie or lose.

``bpo eval`` judges a BPO rewrite against the raw prompt with it, and DRPO's arms comparison each arm
against raw; both read verdicts and tally outcomes here.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import InputError, read_rows

__all__ = ["JUDGE_PROMPTS", "load_judge_prompt", "outcome", "pair_prompt", "verdict", "win_tie_lose_bars"]

#: FastChat's judge prompts, shipped with the package (bpo_plugins/data/judge/NOTICE).
JUDGE_PROMPTS = "fastchat_judge_prompts.jsonl"


def load_judge_prompt(path: str | Path | None = None, name: str = "pair-v2") -> dict[str, str]:
    """The judge prompt called ``name`` from a FastChat judge-prompts file (default: the packaged copy)."""
    if path is None:
        with resources.as_file(resources.files("bpo_plugins").joinpath("data", "judge", JUDGE_PROMPTS)) as packaged:
            return load_judge_prompt(packaged, name)
    for row in read_rows(path):
        if row.get("name") == name:
            if not all(isinstance(row.get(key), str) for key in ("system_prompt", "prompt_template")):
                raise InputError(path, f"the judge prompt {name!r} needs string 'system_prompt' and 'prompt_template' fields")
            return row
    raise InputError(path, f"no judge prompt named {name!r}")


def verdict(text: str) -> str:
    """'A', 'B' or 'C' (tie) from a pair-v2 judgement; an unparsable one counts as a tie."""
    found = re.findall(r"\[\[([ABC])\]\]", text)
    return found[-1] if found else "C"


def pair_prompt(judge_prompt: dict[str, str], question: str, answer_a: str, answer_b: str) -> str:
    text = judge_prompt["prompt_template"].replace("{question}", question)
    return text.replace("{answer_a}", answer_a).replace("{answer_b}", answer_b)


def outcome(treated_first: str, treated_second: str) -> str:
    """win, tie or lose for the treated answer from the verdicts with it first (it is A) and second
    (it is B). Both orders must agree for a win or a loss; disagreement is position bias, a tie."""
    votes = ["tie" if v == "C" else ("win" if v == mine else "lose") for v, mine in ((treated_first, "A"), (treated_second, "B"))]
    return votes[0] if votes[0] == votes[1] else "tie"


def win_tie_lose_bars(ax: Any, rows: dict[str, dict[str, float]], title: str) -> None:
    """Stacked horizontal bars of win, tie and lose percentages on a matplotlib axis, one bar per row."""
    left = [0.0] * len(rows)
    for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("lose", "tab:red")):
        values = [row[key] for row in rows.values()]
        ax.barh(list(rows), values, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
