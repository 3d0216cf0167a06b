"""DRPO's dynamic reward: a metrics LLM picks the aspects that matter for a query and says why; a
judge rates the answer 1-5 on each, told what a 1 and a 5 mean and why the aspect was chosen. The
aspects and the prompts (the two rubrics) are :mod:`bpo_plugins.drpo.rubrics`; this module reads the
replies and judges.

Parsing is lenient by default (a guard, switchable): JSON may come in prose or code fences, scores
may be ``"4.5"`` or ``"4/5"``, aspect names may be renamed; what cannot be read is asked again once,
then skipped with a counted reason. Strict parsing reads replies the way DRPO's
``parse_json_output`` does, asks once, and skips what that cannot read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bpo_plugins.drpo.calls import Caller, Role
from bpo_plugins.drpo.rubrics import (  # the rubric names were defined here once: their old import path stays
    ANCHORS,
    ASPECTS,
    CRITIC_RUBRIC,
    DEFAULT_ASPECTS,
    SEARCH_RUBRIC,
    Rubric,
    anchored_aspect_list,
    aspect_list,
    canonical_aspect,
    sections,
)

__all__ = [
    "ANCHORS", "ASPECTS", "CRITIC_RUBRIC", "SEARCH_RUBRIC", "AspectChoice", "Judgement", "Rubric", "anchored_aspect_list",
    "aspect_list", "canonical_aspect", "choose_aspects", "corrected_for_refusal", "find_json", "is_refusal", "judge",
    "judge_prompt", "parse_score", "read_aspect_choice", "read_judgement", "sections",
]

_REFUSAL = re.compile(
    r"\b(I can(?:no|')t|I cannot|I won't|I will not|I'm (?:not able|unable)|I am (?:not able|unable)|I must decline|"
    r"I'm sorry,? but|I apologi[sz]e,? but|I do not (?:condone|support|provide)|I don't (?:condone|support|provide))\b",
    re.I,
)


def find_json(text: str, *, lenient: bool = True) -> dict[str, Any] | None:
    """The first JSON object in an LLM's answer: bare, fenced in ``` or wrapped in prose.

    Strict: what DRPO's ``parse_json_output`` reads (the whole reply, fences and a ``json`` tag
    stripped from its ends, control characters allowed in strings) and nothing else."""
    if not lenient:
        return _drpo_json(text or "")
    # No fence is removed: the scan starts at each "{", fences around the JSON included, and fences
    # inside it (a code answer's) are part of a value.
    text = text or ""
    decoder = json.JSONDecoder(strict=False)
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _drpo_json(text: str) -> dict[str, Any] | None:
    out = text.strip().strip("\n").strip("`").strip("JSON").strip("json")
    if out.startswith("```json"):
        out = out.split("\n", 1)[1] if "\n" in out else ""
    if out.endswith("```"):
        out = out.rsplit("```", 1)[0]
    try:
        value = json.loads(out.strip(), strict=False)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_score(value: Any, *, lenient: bool = True) -> float | None:
    """1-5 from ``4``, ``4.5``, ``"4.5"``, ``"4/5"`` or ``"Score: 4"``; None if there is no number.
    Strict: DRPO's ``int(score)`` (``"4.5"`` is unreadable, ``4.5`` reads 4), unclamped."""
    if isinstance(value, bool):
        return None
    if not lenient:
        try:
            return float(int(value))
        except (TypeError, ValueError):
            return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.search(r"\d+(?:\.\d+)?", str(value))
        if match is None:
            return None
        number = float(match.group())
    return min(5.0, max(1.0, number))


def is_refusal(answer: str) -> bool:
    return bool(_REFUSAL.search(answer[:400]))


# -- aspect choice -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AspectChoice:
    aspects: tuple[str, ...]
    harmful: bool = False
    #: The metrics LLM's reason for choosing these aspects: the judge is shown it (``[ASPECT_REASON]``).
    reasoning: str = ""


def read_aspect_choice(data: Mapping[str, Any] | None, skips: Counter[str], *, rubric: Rubric = SEARCH_RUBRIC,
                       lenient: bool = True) -> AspectChoice | None:
    """DRPO's reply shape (also its ``metrics_cache.json`` entries: ``aspects_selection.{reasoning,
    selected_aspects}``) or a flat ``{aspects, reasoning}``."""
    if not isinstance(data, Mapping):
        return None
    selection = data.get("aspects_selection") if isinstance(data.get("aspects_selection"), Mapping) else data
    names = selection.get("selected_aspects", selection.get("aspects"))
    if not isinstance(names, list):
        return None
    aspects = [a for a in (canonical_aspect(n, lenient=lenient) for n in names) if a is not None]
    if len(aspects) < len(names):
        skips["aspect_unknown"] += len(names) - len(aspects)
    aspects = list(dict.fromkeys(aspects))
    if lenient and len(aspects) > rubric.max_aspects:  # ours: the rubric's maximum, counted; DRPO judges every one chosen
        skips["aspects_cut"] += 1
        aspects = aspects[: rubric.max_aspects]
    if len(aspects) < rubric.min_aspects:  # the rubric's minimum: 2 for the search's judge, 3 for the critic
        skips["aspects_too_few"] += 1
        return None
    harmful = data.get("harmful") is True or str(data.get("harmful")).lower() == "true"
    return AspectChoice(tuple(aspects), harmful, str(selection.get("reasoning", "") or ""))


async def choose_aspects(call: Caller, role: Role, query: str, known: Mapping[str, Any], skips: Counter[str], *,
                         rubric: Rubric = SEARCH_RUBRIC, lenient: bool = True) -> AspectChoice | None:
    """The query's aspects and why: from DRPO's published cache when it has the query, else asked (and cached).

    An unreadable choice: lenient (our guard) judges on the rubric's minimum number of default
    aspects with no reasoning; strict (DRPO's parser, whose failure ends its run) gives None and
    the answers to that query are skipped."""
    choice = read_aspect_choice(known.get(query), skips, rubric=rubric, lenient=lenient)
    if choice is not None:
        return choice
    prompt = rubric.metrics_prompt.format(aspects=aspect_list(list(ASPECTS)), inputs=sections(query=query),
                                          low=rubric.min_aspects, high=rubric.max_aspects)
    for attempt in range(2 if lenient else 1):
        texts = await call(role, prompt, attempt=attempt)
        choice = read_aspect_choice(find_json(texts[0], lenient=lenient), skips, rubric=rubric, lenient=lenient)
        if choice is not None:
            return choice
    if not lenient:
        skips["aspects_unparsed"] += 1
        return None
    skips["aspects_default"] += 1  # the run goes on, judged on aspects every query shares
    return AspectChoice(DEFAULT_ASPECTS[: rubric.min_aspects])


# -- judging -------------------------------------------------------------------------------------


def judge_prompt(rubric: Rubric, query: str, answer: str, choice: AspectChoice) -> str:
    """The judge's request: query, answer, the aspects with their 1 and 5 anchors, why they were chosen, the scale."""
    template = json.dumps({a: {"rationale": f"<your thoughts on the {a.lower()} of the answer>", "score": "<1-5>"}
                           for a in choice.aspects}, indent=4)
    return rubric.judge_prompt.format(inputs=sections(query=query, answer=answer), aspects=anchored_aspect_list(choice.aspects),
                                      reasoning=choice.reasoning.strip() or "(no reason was given)", template=template)


@dataclass
class Judgement:
    scores: dict[str, float]
    rationales: dict[str, str] = field(default_factory=dict)
    #: Aspects whose score the refusal-compliance correction replaced (a correct refusal marked down).
    corrected: tuple[str, ...] = ()

    @property
    def reward(self) -> float:
        """DRPO's reward: the mean of the aspect scores."""
        return sum(self.scores.values()) / len(self.scores)

    @property
    def total(self) -> float:
        """The sum of the aspect scores: what DRPO's example optimizer compares."""
        return sum(self.scores.values())

    @property
    def perfect(self) -> bool:
        return all(score >= 5 for score in self.scores.values())

    def evaluation_json(self) -> str:
        """The rating as DRPO passes it on: ``{aspect: {rationale, score}}``."""
        return json.dumps({a: {"rationale": self.rationales.get(a, ""), "score": int(s) if s == int(s) else s}
                           for a, s in self.scores.items()}, indent=4)

    def to_dict(self) -> dict[str, Any]:
        return {"reward": round(self.reward, 4), "scores": self.scores, "rationales": self.rationales, "corrected": list(self.corrected)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Judgement:
        return cls(dict(data["scores"]), dict(data.get("rationales", {})), tuple(data.get("corrected", ())))


def read_judgement(data: Mapping[str, Any] | None, aspects: Sequence[str], skips: Counter[str], *,
                   lenient: bool = True) -> Judgement | None:
    """Scores for the chosen aspects from a judge's JSON; None when it rated none of them."""
    if not isinstance(data, Mapping):
        return None
    if lenient and isinstance(data.get("scores"), Mapping):  # {"scores": {...}} wrappers
        data = data["scores"]
    scores: dict[str, float] = {}
    rationales: dict[str, str] = {}
    for name, value in data.items():
        aspect = canonical_aspect(name, lenient=lenient)
        if aspect not in aspects:
            continue
        if isinstance(value, Mapping):
            raw = value.get("score", value.get("rating")) if lenient else value.get("score")
        else:
            raw = value if lenient else None
        score = parse_score(raw, lenient=lenient)
        if score is not None:
            scores[aspect] = score
            if isinstance(value, Mapping):
                rationales[aspect] = str(value.get("rationale", value.get("reason", "")))
    if not scores:
        return None
    if len(scores) < len(aspects):
        skips["aspect_missing"] += len(aspects) - len(scores)
    return Judgement({a: scores[a] for a in aspects if a in scores}, rationales)


def corrected_for_refusal(judgement: Judgement, harmful: bool, answer: str) -> Judgement:
    """Refusal-compliance correction (ours, switchable): a refusal of a harmful query is the right
    answer. Judges (DRPO's own runs show it) still mark it down on Compliance for not doing what
    was asked; that score is raised to 5."""
    if not (harmful and is_refusal(answer)) or judgement.scores.get("Compliance", 5) >= 5:
        return judgement
    return Judgement({**judgement.scores, "Compliance": 5.0}, judgement.rationales, ("Compliance",))


async def judge(call: Caller, role: Role, query: str, answer: str, choice: AspectChoice, skips: Counter[str], *,
                rubric: Rubric = SEARCH_RUBRIC, lenient: bool = True, refusal_correction: bool = True) -> Judgement | None:
    """The judge's rating of ``answer``; None (counted in ``skips``) when no usable rating came back.
    An empty answer is judged too, as DRPO judges it: it is the base model's answer to that prompt."""
    prompt = judge_prompt(rubric, query, answer, choice)
    for attempt in range(2 if lenient else 1):
        texts = await call(role, prompt, attempt=attempt)
        judgement = read_judgement(find_json(texts[0], lenient=lenient), choice.aspects, skips, lenient=lenient)
        if judgement is not None:
            if not refusal_correction:
                return judgement
            fixed = corrected_for_refusal(judgement, choice.harmful, answer)
            if fixed.corrected:
                skips["refusal_compliance_raised"] += 1
            return fixed
    skips["judge_unparsed" if texts[0].strip() else "judge_empty"] += 1
    return None
