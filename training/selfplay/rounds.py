"""The rounds: each round's data, SFT and held-out figures, and the report."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bpo_plugins.guards import word_count
from bpo_plugins.inputs import UsageError
from bpo_plugins.registry import BUNDLED_ADAPTER
from bpo_plugins.training.data import Pair
from bpo_plugins.training.scores import (
    ANSWER_TIE_BAND,
    LIKELIHOOD_TIE_BAND,
    LikelihoodScorer,
    ScoreCache,
    answer_margins,
    target_answers,
    target_text,
    win_tie_loss,
)
from bpo_plugins.training.selfplay.config import SHIPPED, Item, SelfplayConfig
from bpo_plugins.training.selfplay.models import _load_target, load_round_optimizer
from bpo_plugins.training.selfplay.pool import load_pool, round_prompts
from bpo_plugins.training.selfplay.selection import (
    Score,
    _done_rows,
    answer_margin_score,
    run_round_data,
)
from bpo_plugins.training.selfplay.train import dpo_round, preference_pairs, train_round

# --- held-out figures -------------------------------------------------------------------------


def _version_figures(items: Sequence[Item], texts: Sequence[str], scorer: LikelihoodScorer | None, target: Any, embedder: Any,
                     cache: ScoreCache, answer_tokens: int, raw: dict[str, Any] | None) -> dict[str, Any]:
    """Both proxies (and their per-item values) for one version of every held-out prompt."""
    asked = [target_text(t, i.context) for t, i in zip(texts, items)]
    figures: dict[str, Any] = {"n": len(items)}
    if scorer is not None:
        figures["likelihood"] = scorer.preferences([(a, i.chosen, i.rejected or "") for a, i in zip(asked, items)])
    answers = target_answers(target, asked, max_new_tokens=answer_tokens, cache=cache)
    figures["answer_margin"] = answer_margins(embedder, answers, [i.chosen for i in items], [i.rejected or "" for i in items])
    figures["answer_words"] = [word_count(a) for a in answers]
    summary: dict[str, Any] = {"n": len(items), "changed_share": round(statistics.fmean(
        [t.strip() != i.prompt.strip() for t, i in zip(texts, items)]), 4)}
    for proxy, band in (("likelihood", LIKELIHOOD_TIE_BAND), ("answer_margin", ANSWER_TIE_BAND)):
        if proxy in figures:
            values = figures[proxy]
            summary[proxy] = win_tie_loss(values, raw[proxy] if raw else values, band)
            if raw is None:
                summary[proxy] = {"mean": summary[proxy]["mean"]}
    summary["answer_words_mean"] = round(statistics.fmean(figures["answer_words"]), 1)
    if raw is not None:
        deltas = [w - r for w, r in zip(figures["answer_words"], raw["answer_words"])]
        summary["answer_words_change"] = round(statistics.fmean(deltas), 1)
        wins = [d for d, m, rm in zip(deltas, figures["answer_margin"], raw["answer_margin"]) if m - rm > ANSWER_TIE_BAND]
        summary["answer_margin_wins_with_longer_answer"] = round(sum(d > 0 for d in wins) / len(wins), 4) if wins else None
    references = [(t, i.reference) for t, i in zip(texts, items) if i.reference]
    if references:
        summary["reference_cosine"] = round(statistics.fmean(embedder.cosine([t for t, _ in references], [r for _, r in references])), 4)
    return {"summary": summary, "values": figures}


def evaluate_heldout(name: str, rewriter: Any, items: Sequence[Item], scorer: LikelihoodScorer | None, target: Any, embedder: Any,
                     cache: ScoreCache, answer_tokens: int, raw: dict[str, Any] | None,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Figures of one version on the held-out items: ``rewriter`` None is the raw prompt, ``"reference"`` BPO's
    rewrite; an optimizer rewrites greedily behind its guards (what users get) and adds its do-no-harm figures."""
    from bpo_plugins.training import evaluate as ev

    extra: dict[str, Any] = {}
    if rewriter is None:
        texts = [i.prompt for i in items]
    elif rewriter == "reference":
        texts = [i.reference or i.prompt for i in items]
    else:
        eval_items = [ev.EvalItem(i.prompt, i.context, i.reference) for i in items]
        proxy, rows = ev.proxy_figures(rewriter.with_options(mode="greedy"), eval_items, embedder, progress=progress)
        texts = [r["rewritten"] for r in rows]
        extra = {k: proxy.get(k) for k in ("fallback_rate", "answered_rate", "degenerate_rate", "meaning_drift", "applied_share",
                                             "expanded_applied_share", "intent_cosine")}
        # Per guard reason (constraint_lost among them): what the guards caught before users could see it.
        extra |= {k: v for k, v in proxy.items() if k.startswith("fallback:")}
        extra["rewrites"] = [{"prompt": i.prompt, "rewritten": t} for i, t in zip(items, texts)]
    result = _version_figures(items, texts, scorer, target, embedder, cache, answer_tokens, raw)
    result["summary"] = {"version": name, **result["summary"], **{k: v for k, v in extra.items() if k != "rewrites"}}
    if "rewrites" in extra:
        result["rewrites"] = extra["rewrites"]
    return result


def fixed_versions(config: SelfplayConfig, versions: dict[str, Callable[[Item], str]]) -> list[dict[str, Any]]:
    """Held-out summaries of fixed texts, the raw prompt's first: each of ``versions`` makes one text per held-out
    item (the prompt with something appended, say). Bounds for what an optimizer could reach, on its table."""
    state = _start(config)
    raw = state.heldout_figures("raw", None, None)
    rows = [raw["summary"]]
    for name, make in versions.items():
        figures = _version_figures(state.heldout, [make(i) for i in state.heldout], state.scorer, state.target, state.embedder,
                                   state.cache, config.answer_tokens, raw["values"])
        rows.append({"version": name, **figures["summary"]})
    return rows


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class _Run:
    """What every step of a run shares: its settings, prompts, target, scorer and cache."""

    config: SelfplayConfig
    out: Path
    pools: list[list[Item]]
    heldout: list[Item]
    train_pairs: list[Pair]
    target: Any
    cache: ScoreCache
    embedder: Any
    scorer: LikelihoodScorer | None
    select_by: LikelihoodScorer | Score

    def heldout_figures(self, name: str, rewriter: Any, raw: dict[str, Any] | None, progress: Any = None) -> dict[str, Any]:
        return evaluate_heldout(name, rewriter, self.heldout, self.scorer, self.target, self.embedder, self.cache,
                                self.config.answer_tokens, raw, progress=progress)

    def round_data(self, items: Sequence[Item], rewriter: Any, path: Path, desc: str) -> dict[str, Any]:
        from tqdm import tqdm

        with tqdm(total=len(items), desc=desc, unit="prompt") as bar:
            return run_round_data(items, rewriter, self.select_by, self.target, path, margin=self.config.margin,
                                  answer_tokens=self.config.answer_tokens, cache=self.cache, progress=bar.update)

    def write(self, report: dict[str, Any]) -> None:
        (self.out / "selfplay.json").write_text(json.dumps(report, indent=2))
        (self.out / "selfplay.md").write_text(markdown(report))


def _start(config: SelfplayConfig) -> _Run:
    from bpo_plugins.embeddings import shared_embedder

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    pools, heldout, train_pairs = load_pool(config)
    if not any(pools):
        raise UsageError(f"no training prompts left in {config.bpo} and the other sources after the held-out split")
    target = _load_target(config)
    cache = ScoreCache(out / "scores.jsonl")
    embedder = shared_embedder()
    try:
        scorer: LikelihoodScorer | None = LikelihoodScorer.from_backend(target, max_response_tokens=config.response_tokens,
                                                                          batch_size=config.score_batch, cache=cache)
    except ValueError:
        scorer = None  # an API target without log-probabilities: selection and figures by answer margin
    select_by: LikelihoodScorer | Score = scorer or answer_margin_score(target, embedder, config.answer_tokens, cache)
    return _Run(config, out, pools, heldout, train_pairs, target, cache, embedder, scorer, select_by)


def run(config: SelfplayConfig, *, measure: int | None = None, train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every round (or, with ``measure``, candidates and scoring for that many prompts only, timed);
    writes ``selfplay.json`` and ``selfplay.md`` (and per round ``round-K/figures.json``) under ``config.out``."""
    state = _start(config)
    report: dict[str, Any] = {"config": asdict(config), "heldout": len(state.heldout), "train_pairs": len(state.train_pairs),
                              "pools": {str(i): len(p) for i, p in enumerate(state.pools)}, "rounds": []}
    adapter: str | Path | None = config.start_adapter
    if measure:
        rewriter = load_round_optimizer(config, adapter, num_candidates=config.num_candidates)
        rewriter.warmup()
        figures = state.round_data(round_prompts(state.pools, 1, measure), rewriter, state.out / "measure" / "pairs.jsonl",
                                   "measure: candidates + scoring")
        report["measure"] = figures
        (state.out / "cost.json").write_text(json.dumps(figures, indent=2))
        return report
    report["baselines"], raw = _baselines(state, adapter)
    for round_no in range(1, config.rounds + 1):
        figures, adapter = _round(state, round_no, adapter, raw, train_overrides or {})
        report["rounds"].append(figures)
        state.write(report)
    state.write(report)
    return report


def _baselines(state: _Run, adapter: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The held-out figures of the raw prompt, BPO's reference rewrite and the starting optimizer; and the raw values."""
    from tqdm import tqdm

    baselines: dict[str, Any] = {}
    with tqdm(total=len(state.heldout) * 3, desc="held-out: raw, reference, start", unit="prompt") as bar:
        raw = state.heldout_figures("raw", None, None)
        bar.update(len(state.heldout))
        baselines["raw"] = raw["summary"]
        baselines["reference"] = state.heldout_figures("reference", "reference", raw["values"])["summary"]
        bar.update(len(state.heldout))
        start = load_round_optimizer(state.config, adapter)
        start_fig = state.heldout_figures(f"start ({adapter or 'base'})", start, raw["values"], progress=bar.update)
        baselines["start"] = start_fig["summary"]
    (state.out / "baselines.json").write_text(json.dumps({**baselines, "start_rewrites": start_fig.get("rewrites")}, indent=2))
    return baselines, raw["values"]


def _round(state: _Run, round_no: int, adapter: str | Path | None, raw: dict[str, Any],
           train_overrides: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """One round: candidates and scoring, training (SFT on every round's kept pairs so far, or DPO on this round's best/worst pairs), held-out figures; its figures and adapter."""
    from tqdm import tqdm

    config, out = state.config, state.out
    round_dir = out / f"round-{round_no}"
    round_dir.mkdir(exist_ok=True)
    begun = time.perf_counter()
    rewriter = load_round_optimizer(config, adapter, round_dir.parent / f"round-{round_no - 1}" / "export",
                                    num_candidates=config.num_candidates)
    data = state.round_data(round_prompts(state.pools, round_no, config.prompts), rewriter, round_dir / "pairs.jsonl",
                            f"round {round_no}: candidates + scoring")
    data_s = time.perf_counter() - begun
    begun = time.perf_counter()
    if config.method == "dpo":  # on-policy: this round's candidates, drawn from the adapter it starts from
        pairs = preference_pairs(_done_rows(round_dir / "pairs.jsonl", config.margin).values(), config.pair_margin)
        start = BUNDLED_ADAPTER if adapter == SHIPPED else adapter
        trained = dpo_round(config, round_dir, pairs, start, **train_overrides)
    else:  # expert iteration keeps what every round so far selected: round k trains on rounds 1..k
        rows = [row for k in range(1, round_no + 1) for row in _done_rows(out / f"round-{k}" / "pairs.jsonl", config.margin).values()]
        trained = train_round(config, round_dir, rows, state.train_pairs, **train_overrides)
    train_s = time.perf_counter() - begun
    adapter = round_dir / "adapter"
    begun = time.perf_counter()
    optimizer = load_round_optimizer(config, adapter, round_dir / "export")
    with tqdm(total=len(state.heldout), desc=f"round {round_no}: held-out", unit="prompt") as bar:
        held = state.heldout_figures(f"round {round_no}", optimizer, raw, progress=bar.update)
    figures = {"round": round_no, "method": config.method, "data": data, "train": trained, "heldout": held["summary"],
               "wall_s": {"data": round(data_s, 1), "train": round(train_s, 1), "heldout": round(time.perf_counter() - begun, 1)}}
    (round_dir / "figures.json").write_text(json.dumps({**figures, "rewrites": held.get("rewrites")}, indent=2))
    return figures, adapter


def _wtl(figures: dict[str, Any], proxy: str) -> str:
    f = figures.get(proxy) or {}
    return "–" if "win" not in f else f"{f['win']} / {f['tie']} / {f['loss']} (net {f['net']:+d})"


def _training(round_figures: dict[str, Any]) -> str:
    trained = round_figures["train"]
    if round_figures.get("method") == "dpo":
        return f"DPO on {trained.get('pairs')} pairs, reward accuracy {trained.get('last_reward_accuracy')}"
    return "SFT"


def heldout_table(versions: Sequence[dict[str, Any]]) -> list[str]:
    """The held-out table's lines, one row per version's summary (several runs' versions side by side, too)."""
    lines = [
        "| version | likelihood pref. | w/t/l vs raw | answer margin | w/t/l vs raw | cos to BPO ref. | changed | drift | answered | "
        "fallbacks (constraint lost) | answer words (change) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in versions:
        drift = "–" if f.get("meaning_drift") is None else f"{f['meaning_drift']:.1%}"
        answered = "–" if f.get("answered_rate") is None else f"{f['answered_rate']:.1%}"
        change = "" if f.get("answer_words_change") is None else f" ({f['answer_words_change']:+.1f})"
        fallbacks = "–" if f.get("fallback_rate") is None else f"{f['fallback_rate']:.1%} ({f.get('fallback:constraint_lost', 0):.1%})"
        lines.append(f"| {f['version']} | {(f.get('likelihood') or {}).get('mean')} | {_wtl(f, 'likelihood')} | "
                     f"{(f.get('answer_margin') or {}).get('mean')} | {_wtl(f, 'answer_margin')} | {f.get('reference_cosine')} | "
                     f"{f['changed_share']:.1%} | {drift} | {answered} | {fallbacks} | {f['answer_words_mean']}{change} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The held-out table, one row per version, and the per-round data figures."""
    rows = [report["baselines"]["raw"], report["baselines"]["reference"], report["baselines"]["start"]]
    rows += [r["heldout"] for r in report["rounds"]]
    lines = [
        "# bpo data selfplay", "",
        f"Held-out: {report['heldout']} BPO pairs no round trains on. Likelihood preference in nats/token (tie band "
        f"{LIKELIHOOD_TIE_BAND}), answer margin in MiniLM cosine (tie band {ANSWER_TIE_BAND}); win/tie/loss against the raw prompt.", "",
        *heldout_table(rows),
    ]
    if report["rounds"]:
        lines += ["", "| round | prompts | kept a candidate | candidates/prompt | guard verdicts | s/prompt: candidates, scoring | training | s | train loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["rounds"]:
            d = r["data"]
            lines.append(f"| {r['round']} | {d['prompts']} | {d['changed_share']:.1%} | {d['candidates_per_prompt']} | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(d['guard_verdicts'].items()))} | "
                         f"{d['candidates_s_per_prompt']}, {d['scoring_s_per_prompt']} | {_training(r)} | {r['wall_s']['train']} | "
                         f"{r['train'].get('train_loss')} |")
    return "\n".join(lines) + "\n"
