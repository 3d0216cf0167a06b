"""``bpo eval``: offline proxy figures for an optimizer, and the paper's pairwise judge win rate.

Proxy figures need no judge: intent preservation (MiniLM cosine of rewrite to original), the
answered-instead-of-rewrote, degenerate and fallback rates, length expansion, and for pairs
with reference rewrites, closeness to the reference (MiniLM cosine, ROUGE-L).

The judge figures follow the paper: a target LLM answers the raw and the rewritten prompt, a
judge LLM compares the two answers with FastChat's ``pair-v2`` prompt in both orders (to cancel
position bias), and win/tie/lose are reported per set. Every LLM call is cached in a JSONL file,
so a rerun resumes.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo_plugins.backends.base import Backend
from bpo_plugins.decoding import Decoding
from bpo_plugins.embeddings import Embedder
from bpo_plugins.guards import answered_reason, clean_output, degenerate_reason, word_count
from bpo_plugins.inputs import InputError, read_rows
from bpo_plugins.pairwise import outcome, pair_prompt, verdict, win_tie_lose_bars
from bpo_plugins.rewriter import Rewriter
from bpo_plugins.templates import PromptTemplate
from bpo_plugins.training.cache import JsonlCache

__all__ = ["DRIFT_COSINE", "PASSTHROUGH", "CallCache", "EvalItem", "judge_set", "markdown_report", "plot", "proxy_figures",
           "read_eval_set", "rouge_l"]

PASSTHROUGH = PromptTemplate(name="passthrough", user="{prompt}")
#: An applied rewrite below this MiniLM cosine with its prompt counts as meaning drift. It is a crude
#: bar: 19.7% of BPO's own reference rewrites (bpo_val.json) fall under it, mostly rich expansions.
DRIFT_COSINE = 0.8


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    context: str | None = None
    reference: str | None = None  # a reference rewrite (BPO's optimized_prompt), when the set has one


def read_eval_set(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """BPO pairs (prompt, optimized_prompt), Dolly/Self-Instruct (instruction, context), Vicuna (text)."""
    items = []
    for row in read_rows(path):
        prompt = next((row[f] for f in ("prompt", "instruction", "text", "question") if isinstance(row.get(f), str)), None)
        if prompt:
            items.append(EvalItem(prompt, row.get("context") or None, row.get("optimized_prompt")))
    if not items:
        raise InputError(path, "no prompts (rows need a string prompt, instruction, text or question field)")
    return items[:limit] if limit else items


def rouge_l(a: str, b: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(b, a)["rougeL"].fmeasure)


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def proxy_figures(rewriter: Rewriter, items: Sequence[EvalItem], embedder: Embedder, *, batch_size: int | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rewrite every item and measure it; return (figures, per-item rows).

    Prompts go in the batches ``bpo optimize --file`` uses for this runtime (one at a time where
    batching does not pay), so the figures are those of the path users run.
    """
    from bpo_plugins.batching import file_batch_size

    batch_size = batch_size or file_batch_size(rewriter)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        results = rewriter.rewrite_batch([i.prompt for i in chunk], contexts=[i.context for i in chunk])
        rows += [_proxy_row(item, result) for item, result in zip(chunk, results)]
        if progress:
            progress(len(chunk))
    generated = [r for r in rows if r["raw_output"]]
    figures: dict[str, Any] = {
        "n": len(rows),
        "fallback_rate": _mean([r["fallback"] is not None for r in rows]),
        "answered_rate": _mean([r["answered"] for r in generated]),
        "degenerate_rate": _mean([r["degenerate"] for r in generated]),
        # Rewrites that fell into a loop and were stopped there; degenerate_rate counts what is left after the cut.
        "loop_cut_rate": _mean([r["loop_cut"] for r in rows]),
        "expansion_ratio_median": round(statistics.median([r["expansion"] for r in generated]), 3) if generated else None,
        "expanded_share": _mean([r["expansion"] > 1.1 for r in generated]),
        "unchanged_share": _mean([r["rewritten"].strip() == r["prompt"].strip() for r in rows]),
    }
    for reason, count in sorted(Counter(r["fallback"] for r in rows if r["fallback"]).items()):
        figures[f"fallback:{reason}"] = round(count / len(rows), 4)
    if generated:
        sims = embedder.cosine([r["raw_output"] for r in generated], [r["prompt"] for r in generated])
        for r, s in zip(generated, sims):
            r["intent_cosine"] = s
        figures["intent_cosine"] = _mean(sims)
    applied = [r for r in rows if r["fallback"] is None and r["rewritten"].strip() != r["prompt"].strip()]
    figures["applied_share"] = _mean([r in applied for r in rows])
    # What users get: prompts whose applied rewrite adds more than 10% (expanded_share counts raw outputs).
    figures["expanded_applied_share"] = _mean([r in applied and (r["expansion"] or 0) > 1.1 for r in rows])
    if applied:
        # Meaning drift: applied rewrites whose MiniLM cosine with the prompt is below DRIFT_COSINE.
        sims = embedder.cosine([r["rewritten"] for r in applied], [r["prompt"] for r in applied])
        for r, s in zip(applied, sims):
            r["applied_cosine"] = s
        figures["meaning_drift"] = _mean([s < DRIFT_COSINE for s in sims])
    figures.update(_reference_figures([r for r in rows if r["reference"]], embedder))
    return figures, rows


def _proxy_row(item: EvalItem, result: Any) -> dict[str, Any]:
    """One item's row: the optimizer's raw output (its first candidate, cleaned) and what it shows."""
    raw = clean_output(result.candidates[0]) if result.candidates else ""
    return {
        "prompt": item.prompt, "reference": item.reference, "raw_output": raw, "rewritten": result.rewritten,
        "fallback": result.fallback and result.fallback.value,
        "loop_cut": result.loops_cut > 0,
        "answered": bool(raw) and answered_reason(item.prompt, raw) is not None,
        "degenerate": bool(raw) and degenerate_reason(item.prompt, raw) is not None,
        "expansion": word_count(raw) / max(word_count(item.prompt), 1) if raw else None,
    }


def _reference_figures(referenced: list[dict[str, Any]], embedder: Embedder) -> dict[str, Any]:
    """How close the rewrites (and the raw prompts) come to the set's reference rewrites."""
    if not referenced:
        return {}
    outs = [r["rewritten"] for r in referenced]
    refs = [r["reference"] for r in referenced]
    figures = {
        "reference_cosine": _mean(embedder.cosine(outs, refs)),
        "raw_prompt_reference_cosine": _mean(embedder.cosine([r["prompt"] for r in referenced], refs)),
        "reference_rouge_l": _mean([rouge_l(o, ref) for o, ref in zip(outs, refs)]),
        "raw_prompt_reference_rouge_l": _mean([rouge_l(r["prompt"], ref) for r, ref in zip(referenced, refs)]),
    }
    keep = [r for r in referenced if r["reference"].strip() == r["prompt"].strip()]
    if keep:
        figures["keep_as_is_cosine"] = _mean(embedder.cosine([r["rewritten"] for r in keep], [r["prompt"] for r in keep]))
    return figures


# --- pairwise judge ----------------------------------------------------------------------------


#: The evaluation's LLM call cache: the training package's one JSONL cache.
CallCache = JsonlCache


def _complete(backend: Backend, prompt: str, system: str | None, max_new_tokens: int) -> str:
    template = PromptTemplate(name="judge", user="{prompt}", system=system) if system else PASSTHROUGH
    output = backend.generate([prompt], template, Decoding(max_new_tokens=max_new_tokens), None)
    return output.generations[0].texts[0]


def judge_set(
    name: str, items: Sequence[EvalItem], rewrites: Sequence[str], target: Backend, judge: Backend,
    judge_prompt: dict[str, str], cache: CallCache, *, answer_tokens: int = 256, judge_tokens: int = 512,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Win/tie/lose of the target answering the rewrite vs the raw prompt, judged in both orders."""
    wins = ties = losses = 0
    for item, rewrite in zip(items, rewrites):
        def ask(prompt: str, context: str | None = item.context) -> str:
            full = prompt if context is None else f"{prompt}\n\n{context}"
            return cache.get_or_call(["answer", target.model_id, full], lambda: _complete(target, full, None, answer_tokens))

        raw_answer, bpo_answer = ask(item.prompt), ask(rewrite)
        question = item.prompt if item.context is None else f"{item.prompt}\n\n{item.context}"
        verdicts = []
        for first, second in ((bpo_answer, raw_answer), (raw_answer, bpo_answer)):
            text = pair_prompt(judge_prompt, question, first, second)
            judged = cache.get_or_call(
                ["judge", judge.model_id, text], lambda text=text: _complete(judge, text, judge_prompt["system_prompt"], judge_tokens)
            )
            verdicts.append(verdict(judged))
        result = outcome(*verdicts)
        wins += result == "win"
        ties += result == "tie"
        losses += result == "lose"
        if progress:
            progress(1)
    n = max(len(items), 1)
    return {"set": name, "n": len(items), "win": round(100 * wins / n, 1), "tie": round(100 * ties / n, 1), "lose": round(100 * losses / n, 1)}


# --- report ------------------------------------------------------------------------------------


def markdown_report(proxy: dict[str, dict[str, Any]], judged: Sequence[dict[str, Any]]) -> str:
    lines = ["# bpo eval", ""]
    if proxy:
        keys = sorted({k for figures in proxy.values() for k in figures})
        lines += ["## Proxy figures", "", "| figure | " + " | ".join(proxy) + " |", "|---|" + "---|" * len(proxy)]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(str(proxy[name].get(key, "")) for name in proxy) + " |")
        lines.append("")
    if judged:
        lines += ["## Pairwise judge (BPO-rewritten vs raw prompt, both orders)", "", "| set | n | win % | tie % | lose % |", "|---|---|---|---|---|"]
        lines += [f"| {j['set']} | {j['n']} | {j['win']} | {j['tie']} | {j['lose']} |" for j in judged]
    return "\n".join(lines) + "\n"


def plot(proxy: dict[str, dict[str, Any]], judged: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(11 if judged else 6, 4), squeeze=False)
    rates = ["fallback_rate", "answered_rate", "degenerate_rate", "expanded_share", "unchanged_share"]
    ax = axes[0][0]
    width = 0.8 / max(len(proxy), 1)
    for i, (name, figures) in enumerate(proxy.items()):
        ax.bar([x + i * width for x in range(len(rates))], [figures.get(r) or 0 for r in rates], width, label=name)
    ax.set_xticks([x + width * (len(proxy) - 1) / 2 for x in range(len(rates))], [r.replace("_", "\n") for r in rates], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("proxy rates")
    ax.legend(fontsize=8)
    if judged:
        win_tie_lose_bars(axes[0][1], {j["set"]: j for j in judged}, "BPO vs raw (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
