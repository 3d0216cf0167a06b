"""``bpo data selfplay``: optimized-prompt pairs without a teacher LLM, in rounds (expert iteration).

Per round:

1. prompts with a preferred and a rejected response: BPO pairs (``good_res``/``bad_res``), opt-in single-turn
   HH-RLHF (chosen/rejected), and optionally Dolly/Self-Instruct (the reference response preferred, the
   target's own greedy answer to the raw prompt rejected);
2. N candidates per prompt from the current optimizer in aggressive mode; the raw prompt is always a
   candidate, so "keep it as it is" is learnable;
3. candidates that fail the Rewriter's own guards (strict preset: drift, lost payload/names/numbers,
   answered, length, degenerate) are dropped, through :meth:`Rewriter.check`;
4. the target scores the rest by likelihood preference (:mod:`bpo_plugins.training.scores`); the best
   is kept when it beats the raw prompt by ``margin`` nats/token, else the raw prompt is kept;
5. SFT (``bpo train``'s :func:`~bpo_plugins.training.sft.train`) on the kept pairs plus the BPO training
   pairs, from the base model; the next round draws candidates from the new adapter.

A fixed, seeded 20% of BPO's pairs is held out of every round (the 30 pairs the shipped ``bpo-small``
held out, filled up with 30 more): every figure is reported on it, for the raw prompt, BPO's reference
rewrite, the starting optimizer and each round's. Work is appended per prompt (``pairs.jsonl``), per
score and per target answer (``scores.jsonl``), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from bpo_plugins.guards import GuardConfig, word_count
from bpo_plugins.inputs import UsageError, read_rows, resume_jsonl
from bpo_plugins.training.data import Pair, normalise, read_pairs, read_triplets
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

__all__ = ["Item", "SelfplayConfig", "Selection", "evaluate_heldout", "heldout_split", "load_pool", "load_round_optimizer",
           "answer_margin_score", "selfplay_command",
           "markdown", "run", "run_round_data", "select", "train_round"]

SHIPPED = "shipped"


@dataclass
class SelfplayConfig:
    out: str = "runs/selfplay"
    bpo: str = "tests/data/bpo/bpo_val.json"
    #: HH-RLHF harmless-base transcripts, opt-in: with a 135M target the likelihood preference kept rewrites
    #: that spell harmful requests out (training/results/selfplay/README.md), so no default.
    hh: str | None = None
    #: Dolly / Self-Instruct sets: reference response preferred, the target's raw answer rejected. They are
    #: eval sets elsewhere (bpo-small's figures); a set named here is no longer held out of training.
    references: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: ["tests/data/bpo/dolly_eval.json", "tests/data/bpo/self_instruct_eval.json",
                                                         "tests/data/bpo/vicuna_eval.jsonl"])
    rounds: int = 2
    prompts: int = 40  # new prompts per round, drawn in turn from each source (cost: training/results/selfplay/README.md)
    num_candidates: int = 8
    margin: float = LIKELIHOOD_TIE_BAND  # nats/token a candidate must beat the raw prompt by to be kept
    heldout_fraction: float = 0.2
    heldout_limit: int | None = None  # score only the first k held-out pairs (tests)
    seed: int = 42
    base_model: str = "smollm2-135m-instruct"
    #: The first round's optimizer: an adapter on base_model ("shipped": the bundled bpo-small's; None: the base).
    start_adapter: str | None = SHIPPED
    #: auto: the bundled models' default runtime (ONNX Runtime GenAI int8), each round's adapter exported
    #: to it; transformers: fp32 torch.
    runtime: str = "auto"
    target: str = "smollm2-135m-instruct"
    target_base_url: str | None = None
    max_new_tokens: int = 128  # per rewrite
    response_tokens: int = 128  # of each response scored by likelihood
    answer_tokens: int = 128  # per target answer (answer margin, Dolly/Self-Instruct rejected answers)
    score_batch: int = 8
    #: TrainConfig fields for each round's SFT (the shipped bpo-small recipe unless told otherwise).
    train: dict[str, Any] = field(default_factory=lambda: {"epochs": 4.0, "learning_rate": 5e-4, "batch_size": 8, "max_length": 256,
                                                            "lora_r": 16, "lora_alpha": 32, "keep_as_is_fraction": 0.1})


@dataclass(frozen=True)
class Item:
    """A prompt with a preferred and a rejected response (``rejected`` None: the target's raw answer, made later)."""

    prompt: str
    chosen: str
    rejected: str | None
    context: str | None = None
    source: str = ""
    reference: str | None = None  # BPO's own rewrite, where the source has one

    @property
    def key(self) -> str:
        return normalise(self.prompt + "\x00" + (self.context or ""))


@dataclass
class Selection:
    """One prompt's candidates, their guard verdicts and scores, and the kept version."""

    raw_score: float
    candidates: list[dict[str, Any]]
    selected: str
    selected_score: float


# --- data -------------------------------------------------------------------------------------


def heldout_split(path: str | Path, fraction: float = 0.2, seed: int = 42) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of BPO's pairs: the held-out slice starts with the 10% that
    ``bpo train``'s seed-42 split (the shipped bpo-small) held out, then a seeded draw of the rest."""
    from bpo_plugins.training.sft import _split_pairs

    pairs = read_pairs([path])
    _, shipped_val = _split_pairs(pairs, 0.1, 42)
    held = {normalise(p.prompt) for p in shipped_val}
    rest = [p for p in pairs if normalise(p.prompt) not in held]
    random.Random(seed).shuffle(rest)
    n = max(int(len(pairs) * fraction), len(shipped_val))
    heldout = list(shipped_val) + rest[: n - len(shipped_val)]
    keys = {normalise(p.prompt) for p in heldout}
    return [p for p in pairs if normalise(p.prompt) not in keys], heldout


def _reference_items(path: str | Path) -> list[Item]:
    items = []
    for row in read_rows(path):
        prompt, reference = row.get("instruction") or row.get("prompt"), row.get("response", row.get("output"))
        if isinstance(prompt, str) and isinstance(reference, str) and prompt.strip() and reference.strip():
            items.append(Item(prompt, reference, None, row.get("context") or None, Path(path).name))
    return items


def load_pool(config: SelfplayConfig) -> tuple[list[list[Item]], list[Item], list[Pair]]:
    """(training prompts per source, held-out items, BPO training pairs); no held-out or excluded prompt is in a pool."""
    from bpo_plugins.training.data import eval_prompts

    train_pairs, heldout = heldout_split(config.bpo, config.heldout_fraction, config.seed)
    banned = eval_prompts([e for e in config.exclude if Path(e).name not in {Path(r).name for r in config.references} and Path(e).exists()])
    banned |= {normalise(p.prompt) for p in heldout}
    sources = [[Item(p.prompt, p.good_res, p.bad_res, p.context, "bpo", p.optimized) for p in train_pairs if p.good_res and p.bad_res]]
    if config.hh:
        # Single-turn transcripts only: a later Human turn ("yep", "what about pens?") means nothing
        # without the dialogue before it, and the optimizer rewrites one prompt.
        sources.append([Item(t.prompt, t.chosen, t.rejected, None, "hh-rlhf") for t in read_triplets(config.hh)])
    for path in config.references:
        sources.append(_reference_items(path))
    pools = []
    for i, source in enumerate(sources):
        seen: set[str] = set()
        kept = []
        for item in source:
            if normalise(item.prompt) not in banned and item.key not in seen:
                seen.add(item.key)
                kept.append(item)
        random.Random(config.seed + i).shuffle(kept)
        pools.append(kept)
    held = [Item(p.prompt, p.good_res, p.bad_res, p.context, "bpo-heldout", p.optimized) for p in heldout]
    return pools, held[: config.heldout_limit] if config.heldout_limit else held, train_pairs


def round_prompts(pools: Sequence[Sequence[Item]], round_no: int, per_round: int) -> list[Item]:
    """Round ``round_no``'s prompts (1-based): the next ``per_round`` of the sources taken in turn, so
    rounds never share a prompt."""
    order: list[Item] = []
    for i in range(max((len(p) for p in pools), default=0)):
        order.extend(pool[i] for pool in pools if i < len(pool))
    return order[(round_no - 1) * per_round : round_no * per_round]


# --- models -----------------------------------------------------------------------------------


def _base_path(config: SelfplayConfig) -> str:
    from bpo_plugins.registry import checkpoint

    return checkpoint(config.base_model)


def load_round_optimizer(config: SelfplayConfig, adapter: str | Path | None, export_dir: Path | None = None, **options: Any) -> Any:
    """The optimizer a round draws candidates from (and is scored as): the base model with ``adapter``,
    on ``config.runtime``, with the strict guards the bundled optimizer runs with."""
    from bpo_plugins import Rewriter
    from bpo_plugins.backends.runtime import default_runtime
    from bpo_plugins.registry import BUNDLED_ADAPTER, DEFAULT_MODEL

    options = {"guards": GuardConfig.strict(), "max_new_tokens": config.max_new_tokens, **options}
    shipped = adapter == SHIPPED
    adapter = BUNDLED_ADAPTER if shipped else adapter
    runtime = default_runtime() if config.runtime == "auto" else None
    if runtime is not None and config.base_model == "smollm2-135m-instruct":
        if shipped:
            return Rewriter.from_pretrained(DEFAULT_MODEL, **options)  # the default runtime's cached export
        if adapter is not None and export_dir is not None:
            from bpo_plugins.inputs import MANIFEST
            from bpo_plugins.onnx_export import build_export
            from bpo_plugins.templates import BPO_CHAT

            engine, precision = runtime
            if not (export_dir / MANIFEST).is_file():
                build_export(_base_path(config), export_dir, precision, engine=engine, name=f"selfplay-{export_dir.parent.name}",
                             template=BPO_CHAT, adapter=Path(adapter), desc=f"export {export_dir.parent.name} ({precision})")
            return Rewriter.from_pretrained(export_dir, backend="onnx", **options)
    return Rewriter.from_pretrained(_base_path(config), backend="transformers", adapter=adapter,
                                    template="bpo-chat" if config.base_model == "smollm2-135m-instruct" else None, **options)


def _load_target(config: SelfplayConfig) -> Any:
    from bpo_plugins.backends import load_backend
    from bpo_plugins.backends.transformers import TransformersBackend
    from bpo_plugins.registry import checkpoint
    from bpo_plugins.spec import resolve_spec

    spec = resolve_spec(config.target, base_url=config.target_base_url)  # the one rule every entry point uses
    if spec.kind == "local":  # in torch, whatever runtime serves it elsewhere: the scorer needs its log-probabilities
        return TransformersBackend.load(checkpoint(spec.model), model_id=config.target)
    return load_backend(spec)


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


def select(item: Item, candidates: Sequence[str], rewriter: Any, scorer: LikelihoodScorer | Score, margin: float) -> Selection:
    """Guard every candidate with the optimizer's own checks, score the raw prompt and the survivors
    with the target (likelihood preference, or a callable such as :func:`answer_margin_score`), and keep
    the best survivor when it beats the raw prompt by more than ``margin``."""
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
    return Selection(round(raw_score, 5), rows, *_pick(item.prompt, round(raw_score, 5), rows, margin))


def _pick(prompt: str, raw_score: float, candidates: Sequence[dict[str, Any]], margin: float) -> tuple[str, float]:
    """(text, score) of the best guard-passing candidate when it beats the raw prompt by more than
    ``margin``; otherwise the raw prompt's."""
    best = max((c for c in candidates if c["guard"] is None and c["score"] is not None), key=lambda c: c["score"], default=None)
    if best is not None and best["score"] - raw_score > margin:
        return best["text"], best["score"]
    return prompt, raw_score


def _selection_fields(prompt: str, raw_score: float, candidates: Sequence[dict[str, Any]], margin: float) -> dict[str, Any]:
    """A pairs.jsonl row's selection, the one rule for a fresh prompt and a resumed one."""
    text, score = _pick(prompt, raw_score, candidates, margin)
    return {"selected": text, "selected_score": score, "changed": text != prompt, "delta": round(score - raw_score, 5)}


def _done_rows(path: Path, margin: float) -> dict[str, dict[str, Any]]:
    """The prompts already done in ``path``, each selected again under ``margin`` from its stored
    scores, so a resumed run with another ``--margin`` re-selects without drawing or scoring again."""
    done = {row["key"]: row for row in resume_jsonl(path)}  # a torn last line is cut: that prompt runs again
    for row in done.values():
        row.update(_selection_fields(row["prompt"], row["raw_score"], row["candidates"], margin))
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
            chosen = select(item, list(result.candidates), rewriter, scorer, margin)
            scored = time.perf_counter() - start
            row = {"key": item.key, "source": item.source, "prompt": item.prompt, "context": item.context, "good_res": item.chosen,
                   "candidates_s": round(took, 3), "scoring_s": round(scored, 3), "bad_res": item.rejected, "raw_score": chosen.raw_score, "candidates": chosen.candidates,
                   **_selection_fields(item.prompt, chosen.raw_score, chosen.candidates, margin)}
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


# --- SFT --------------------------------------------------------------------------------------


def train_round(config: SelfplayConfig, round_dir: Path, rows: Sequence[dict[str, Any]], train_pairs: Sequence[Pair],
                **overrides: Any) -> dict[str, Any]:
    """LoRA SFT from the base model on the kept pairs of this round and the ones before plus BPO's training pairs
    (resumes; skips when done)."""
    from bpo_plugins.training.sft import TrainConfig, train

    adapter = round_dir / "adapter"
    figures_path = adapter / "train_figures.json"
    data = round_dir / "train.jsonl"
    kept = [Pair(r["prompt"], r["selected"], r["good_res"], r["bad_res"], r.get("context"), r["source"]) for r in rows]
    text = "".join(json.dumps(p.to_bpo(), ensure_ascii=False) + "\n" for p in [*train_pairs, *kept])
    if figures_path.is_file():
        if data.is_file() and data.read_text(encoding="utf-8") != text:
            raise UsageError(f"{adapter}: trained on another selection (a different --margin?); "
                             f"copy the round's pairs.jsonl into a new --out to train on this one")
        return {k: v for k, v in json.loads(figures_path.read_text()).items() if k != "log_history"}
    data.write_text(text, encoding="utf-8")
    settings = {**config.train, **overrides}
    base_template = "bpo-chat" if config.base_model == "smollm2-135m-instruct" else "auto"
    cfg = TrainConfig(data=[str(data)], base_model=config.base_model, out=str(adapter), template=settings.pop("template", base_template),
                      val_fraction=0.0, seed=config.seed, **settings)
    figures = train(cfg)
    return {k: v for k, v in figures.items() if k != "log_history"}


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
        extra["rewrites"] = [{"prompt": i.prompt, "rewritten": t} for i, t in zip(items, texts)]
    result = _version_figures(items, texts, scorer, target, embedder, cache, answer_tokens, raw)
    result["summary"] = {"version": name, **result["summary"], **{k: v for k, v in extra.items() if k != "rewrites"}}
    if "rewrites" in extra:
        result["rewrites"] = extra["rewrites"]
    return result


# --- the loop ---------------------------------------------------------------------------------


def run(config: SelfplayConfig, *, measure: int | None = None, train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every round (or, with ``measure``, candidates and scoring for that many prompts only, timed);
    writes ``selfplay.json`` and ``selfplay.md`` (and per round ``round-K/figures.json``) under ``config.out``."""
    from tqdm import tqdm

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
    report: dict[str, Any] = {"config": asdict(config), "heldout": len(heldout), "train_pairs": len(train_pairs),
                              "pools": {str(i): len(p) for i, p in enumerate(pools)}, "rounds": []}
    adapter: str | Path | None = config.start_adapter
    if measure:
        rewriter = load_round_optimizer(config, adapter, num_candidates=config.num_candidates)
        rewriter.warmup()
        items = round_prompts(pools, 1, measure)
        with tqdm(total=len(items), desc="measure: candidates + scoring", unit="prompt") as bar:
            figures = run_round_data(items, rewriter, select_by, target, out / "measure" / "pairs.jsonl", margin=config.margin,
                                     answer_tokens=config.answer_tokens, cache=cache, progress=bar.update)
        report["measure"] = figures
        (out / "cost.json").write_text(json.dumps(figures, indent=2))
        return report

    baselines: dict[str, Any] = {}
    with tqdm(total=len(heldout) * 3, desc="held-out: raw, reference, start", unit="prompt") as bar:
        raw = evaluate_heldout("raw", None, heldout, scorer, target, embedder, cache, config.answer_tokens, None)
        bar.update(len(heldout))
        baselines["raw"] = raw["summary"]
        baselines["reference"] = evaluate_heldout("reference", "reference", heldout, scorer, target, embedder, cache,
                                                  config.answer_tokens, raw["values"])["summary"]
        bar.update(len(heldout))
        start = load_round_optimizer(config, adapter)
        start_fig = evaluate_heldout(f"start ({adapter or 'base'})", start, heldout, scorer, target, embedder, cache,
                                     config.answer_tokens, raw["values"], progress=bar.update)
        baselines["start"] = start_fig["summary"]
    report["baselines"] = baselines
    (out / "baselines.json").write_text(json.dumps({**baselines, "start_rewrites": start_fig.get("rewrites")}, indent=2))
    for round_no in range(1, config.rounds + 1):
        round_dir = out / f"round-{round_no}"
        round_dir.mkdir(exist_ok=True)
        begun = time.perf_counter()
        rewriter = load_round_optimizer(config, adapter, round_dir.parent / f"round-{round_no - 1}" / "export",
                                        num_candidates=config.num_candidates)
        items = round_prompts(pools, round_no, config.prompts)
        with tqdm(total=len(items), desc=f"round {round_no}: candidates + scoring", unit="prompt") as bar:
            data = run_round_data(items, rewriter, select_by, target, round_dir / "pairs.jsonl", margin=config.margin,
                                  answer_tokens=config.answer_tokens, cache=cache, progress=bar.update)
        data_s = time.perf_counter() - begun
        # Expert iteration keeps what every round so far selected: round k trains on rounds 1..k.
        rows = [row for k in range(1, round_no + 1) for row in _done_rows(out / f"round-{k}" / "pairs.jsonl", config.margin).values()]
        begun = time.perf_counter()
        sft = train_round(config, round_dir, rows, train_pairs, **(train_overrides or {}))
        sft_s = time.perf_counter() - begun
        adapter = round_dir / "adapter"
        begun = time.perf_counter()
        optimizer = load_round_optimizer(config, adapter, round_dir / "export")
        with tqdm(total=len(heldout), desc=f"round {round_no}: held-out", unit="prompt") as bar:
            held = evaluate_heldout(f"round {round_no}", optimizer, heldout, scorer, target, embedder, cache, config.answer_tokens,
                                    raw["values"], progress=bar.update)
        figures = {"round": round_no, "data": data, "sft": sft, "heldout": held["summary"],
                   "wall_s": {"data": round(data_s, 1), "sft": round(sft_s, 1), "heldout": round(time.perf_counter() - begun, 1)}}
        (round_dir / "figures.json").write_text(json.dumps({**figures, "rewrites": held.get("rewrites")}, indent=2))
        report["rounds"].append(figures)
        (out / "selfplay.json").write_text(json.dumps(report, indent=2))
        (out / "selfplay.md").write_text(markdown(report))
    (out / "selfplay.json").write_text(json.dumps(report, indent=2))
    (out / "selfplay.md").write_text(markdown(report))
    return report


def _wtl(figures: dict[str, Any], proxy: str) -> str:
    f = figures.get(proxy) or {}
    return "–" if "win" not in f else f"{f['win']} / {f['tie']} / {f['loss']} (net {f['net']:+d})"


def markdown(report: dict[str, Any]) -> str:
    """The held-out table, one row per version, and the per-round data figures."""
    rows = [report["baselines"]["raw"], report["baselines"]["reference"], report["baselines"]["start"]]
    rows += [r["heldout"] for r in report["rounds"]]
    lines = [
        "# bpo data selfplay", "",
        f"Held-out: {report['heldout']} BPO pairs no round trains on. Likelihood preference in nats/token (tie band "
        f"{LIKELIHOOD_TIE_BAND}), answer margin in MiniLM cosine (tie band {ANSWER_TIE_BAND}); win/tie/loss against the raw prompt.", "",
        "| version | likelihood pref. | w/t/l vs raw | answer margin | w/t/l vs raw | cos to BPO ref. | changed | drift | answered | answer words (change) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in rows:
        drift = "–" if f.get("meaning_drift") is None else f"{f['meaning_drift']:.1%}"
        answered = "–" if f.get("answered_rate") is None else f"{f['answered_rate']:.1%}"
        change = "" if f.get("answer_words_change") is None else f" ({f['answer_words_change']:+.1f})"
        lines.append(f"| {f['version']} | {(f.get('likelihood') or {}).get('mean')} | {_wtl(f, 'likelihood')} | "
                     f"{(f.get('answer_margin') or {}).get('mean')} | {_wtl(f, 'answer_margin')} | {f.get('reference_cosine')} | "
                     f"{f['changed_share']:.1%} | {drift} | {answered} | {f['answer_words_mean']}{change} |")
    if report["rounds"]:
        lines += ["", "| round | prompts | kept a candidate | candidates/prompt | guard verdicts | s/prompt: candidates, scoring | SFT s | train loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["rounds"]:
            d = r["data"]
            lines.append(f"| {r['round']} | {d['prompts']} | {d['changed_share']:.1%} | {d['candidates_per_prompt']} | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(d['guard_verdicts'].items()))} | "
                         f"{d['candidates_s_per_prompt']}, {d['scoring_s_per_prompt']} | {r['wall_s']['sft']} | {r['sft'].get('train_loss')} |")
    return "\n".join(lines) + "\n"


# --- command line -----------------------------------------------------------------------------


def selfplay_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: pairs, adapters, scores, selfplay.json/.md.")] = Path("runs/selfplay"),
    bpo: Annotated[Path, typer.Option("--bpo", help="BPO pairs with good_res/bad_res (20% held out).")] = Path("tests/data/bpo/bpo_val.json"),
    hh: Annotated[Path | None, typer.Option("--hh", help="HH-RLHF transcripts, opt-in (single-turn ones are used; see the results README).")] = None,
    reference: Annotated[list[Path] | None, typer.Option("--reference", help="Dolly/Self-Instruct set: reference preferred, the target's answer rejected.")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1)] = 2,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="New prompts per round.")] = 40,
    num_candidates: Annotated[int, typer.Option("--num-candidates", "-n", min=1, help="Aggressive-mode candidates per prompt.")] = 8,
    margin: Annotated[float, typer.Option("--margin", help="Nats/token a candidate must beat the raw prompt by. A resumed run selects again from its stored scores; a round already trained on another selection stops with exit 2 (copy its pairs.jsonl into a new --out).")] = LIKELIHOOD_TIE_BAND,
    target: Annotated[str, typer.Option("--target", help="Target model: registry name, folder, or API model (with --target-base-url).")] = "smollm2-135m-instruct",
    target_base_url: Annotated[str | None, typer.Option("--target-base-url")] = None,
    base_model: Annotated[str, typer.Option("--base-model", help="The optimizer's base model.")] = "smollm2-135m-instruct",
    start_adapter: Annotated[str | None, typer.Option("--start-adapter", help="First round's adapter: 'shipped' (bpo-small), a folder, or 'none'.")] = SHIPPED,
    runtime: Annotated[str, typer.Option("--runtime", help="auto (GenAI int8 for the bundled base) | transformers")] = "auto",
    heldout_limit: Annotated[int | None, typer.Option("--heldout-limit", min=1, help="Score only the first k held-out pairs.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", min=1)] = 128,
    response_tokens: Annotated[int, typer.Option("--response-tokens", min=1, help="Tokens of each response the likelihood scores.")] = 128,
    measure: Annotated[int | None, typer.Option("--measure", min=1, help="Only time candidates and scoring on this many prompts (cost.json).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 42,
) -> None:
    """Optimized-prompt pairs without a teacher: best-of-N aggressive rewrites judged by the target's own
    likelihood preference, guarded, then SFT, in rounds; figures on a fixed held-out BPO split."""
    if runtime not in ("auto", "transformers"):
        raise UsageError(f"--runtime {runtime!r}: use auto or transformers")
    for path in [bpo, *([] if hh is None else [hh]), *(reference or [])]:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    config = SelfplayConfig(
        out=str(out), bpo=str(bpo), hh=None if hh is None else str(hh), references=[str(r) for r in reference or []],
        rounds=rounds, prompts=prompts, num_candidates=num_candidates, margin=margin, target=target, target_base_url=target_base_url,
        base_model=base_model, start_adapter=None if start_adapter in (None, "none") else start_adapter, runtime=runtime,
        heldout_limit=heldout_limit, answer_tokens=answer_tokens, response_tokens=response_tokens, seed=seed,
    )
    overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps}.items() if v is not None}
    report = run(config, measure=measure, train_overrides=overrides)
    if measure:
        typer.echo(json.dumps(report["measure"], indent=2))
    else:
        typer.echo(markdown(report))
    typer.echo(f"figures in {out}/{'cost.json' if measure else 'selfplay.json, selfplay.md'}", err=True)
