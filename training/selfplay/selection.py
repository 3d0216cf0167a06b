"""One prompt: its candidates judged by the guards, scored by the target, and the kept version; a round's rows, resumable."""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import resume_jsonl
from bpo_plugins.training.scores import (
    LikelihoodScorer,
    ScoreCache,
    answer_margins,
    target_answers,
    target_text,
)
from bpo_plugins.training.selfplay.config import Item, Selection

# --- one prompt -------------------------------------------------------------------------------


def _unique(texts: Sequence[str], prompt: str) -> list[str]:
    seen, out = {prompt.strip()}, []
    for text in texts:
        if text.strip() and text.strip() not in seen:
            seen.add(text.strip())
            out.append(text)
    return out


Score = Callable[[Sequence[tuple[str, str, str]]], list[float]]


def answer_margin_score(target: Any, embedder: Any, answer_tokens: int, cache: ScoreCache) -> Score:
    """Selection by answer margin, for a target without token log-probabilities (an API model): one
    greedy answer per version, so N+1 generations per prompt instead of teacher-forced passes."""

    def score(triples: Sequence[tuple[str, str, str]]) -> list[float]:
        answers = target_answers(target, [p for p, _, _ in triples], max_new_tokens=answer_tokens, cache=cache)
        return answer_margins(embedder, answers, [g for _, g, _ in triples], [b for _, _, b in triples])

    return score


def select(item: Item, candidates: Sequence[str], rewriter: Any, scorer: LikelihoodScorer | Score) -> Selection:
    """Guard every candidate with the optimizer's own checks, score the raw prompt and the survivors
    with the target (likelihood preference, or a callable such as :func:`answer_margin_score`).
    :func:`selection_fields` then keeps the best survivor when it beats the raw prompt by more than a margin."""
    assert item.rejected is not None
    candidates = _unique(candidates, item.prompt)
    verdicts = rewriter.check([item.prompt] * len(candidates), [[c] for c in candidates], mode="aggressive") if candidates else []
    rows = [{"text": c, "guard": None if v.fallback is None else v.fallback.value, "score": None} for c, v in zip(candidates, verdicts)]
    passing = [row for row in rows if row["guard"] is None]
    score = scorer.preferences if isinstance(scorer, LikelihoodScorer) else scorer
    scores = score([(target_text(v, item.context), item.chosen, item.rejected)
                                 for v in [item.prompt, *(row["text"] for row in passing)]])
    raw_score = scores[0]
    for row, score in zip(passing, scores[1:]):
        row["score"] = round(score, 5)
    return Selection(round(raw_score, 5), rows)


def _pick(prompt: str, raw_score: float, candidates: Sequence[dict[str, Any]], margin: float) -> tuple[str, float]:
    """(text, score) of the best guard-passing candidate when it beats the raw prompt by more than
    ``margin``; otherwise the raw prompt's."""
    best = max((c for c in candidates if c["guard"] is None and c["score"] is not None), key=lambda c: c["score"], default=None)
    if best is not None and best["score"] - raw_score > margin:
        return best["text"], best["score"]
    return prompt, raw_score


def selection_fields(prompt: str, raw_score: float, candidates: Sequence[dict[str, Any]], margin: float) -> dict[str, Any]:
    """A pairs.jsonl row's selection, the one rule for a fresh prompt and a resumed one."""
    text, score = _pick(prompt, raw_score, candidates, margin)
    return {"selected": text, "selected_score": score, "changed": text != prompt, "delta": round(score - raw_score, 5)}


def _done_rows(path: Path, margin: float) -> dict[str, dict[str, Any]]:
    """The prompts already done in ``path``, each selected again under ``margin`` from its stored
    scores, so a resumed run with another ``--margin`` re-selects without drawing or scoring again."""
    done = {row["key"]: row for row in resume_jsonl(path)}  # a torn last line is cut: that prompt runs again
    for row in done.values():
        row.update(selection_fields(row["prompt"], row["raw_score"], row["candidates"], margin))
    return done


def run_round_data(items: Sequence[Item], rewriter: Any, scorer: LikelihoodScorer | Score, target: Any, out: Path, *, margin: float,
                   answer_tokens: int, cache: ScoreCache, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Candidates, guards, scores and selection for every item not yet in ``out``; figures of this call."""
    done = _done_rows(out, margin)
    todo = [item for item in items if item.key not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink:
        for item in todo:
            if item.rejected is None:  # Dolly / Self-Instruct: the target's own raw answer is the rejected one
                answer = target_answers(target, [target_text(item.prompt, item.context)], max_new_tokens=answer_tokens, cache=cache)[0]
                item = Item(item.prompt, item.chosen, answer or "(no answer)", item.context, item.source, item.reference)
            start = time.perf_counter()
            result = rewriter.rewrite_batch([item.prompt], contexts=[item.context], mode="aggressive")[0]
            took = time.perf_counter() - start
            start = time.perf_counter()
            chosen = select(item, list(result.candidates), rewriter, scorer)
            scored = time.perf_counter() - start
            row = {"key": item.key, "source": item.source, "prompt": item.prompt, "context": item.context, "good_res": item.chosen,
                   "candidates_s": round(took, 3), "scoring_s": round(scored, 3), "bad_res": item.rejected, "raw_score": chosen.raw_score, "candidates": chosen.candidates,
                   **selection_fields(item.prompt, chosen.raw_score, chosen.candidates, margin)}
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            done[item.key] = row
            if progress:
                progress(1)
    rows = [done[item.key] for item in items if item.key in done]
    # Timings of every prompt done, in this call or an earlier one (rows written before they were kept have none).
    timed = [r for r in rows if "candidates_s" in r]
    gen_s, score_s = sum(r["candidates_s"] for r in timed), sum(r["scoring_s"] for r in timed)
    guards = Counter(c["guard"] or "passed" for r in rows for c in r["candidates"])
    n = max(len(timed), 1)
    return {
        "prompts": len(rows), "resumed": len(items) - len(todo), "generated": len(todo),
        "candidates_s_per_prompt": round(gen_s / n, 2), "scoring_s_per_prompt": round(score_s / n, 2),
        "candidates_prompts_per_s": round(len(timed) / gen_s, 4) if gen_s else None,
        "scoring_prompts_per_s": round(len(timed) / score_s, 4) if score_s else None,
        "candidates_per_prompt": round(statistics.fmean([len(r["candidates"]) for r in rows]), 2) if rows else 0,
        "guard_verdicts": dict(guards),
        "changed_share": round(statistics.fmean([r["changed"] for r in rows]), 4) if rows else 0,
        "mean_delta_kept": round(statistics.fmean([r["delta"] for r in rows if r["changed"]]), 4) if any(r["changed"] for r in rows) else None,
        "by_source": dict(Counter(r["source"] for r in rows)),
    }
