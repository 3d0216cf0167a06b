"""``bpo data mix``: public rewrite pairs from several repositories, in ``bpo train``'s pair format (issue 30 §1).

One recipe per source reads that source's own files (exported from its repository, never committed here)
and yields (prompt -> optimized prompt) pairs. The mix then:

1. refuses a source whose licence does not let us ship a model trained on it, unless told it is a research run;
2. drops every prompt of an evaluation set or of the fixed held-out split (BPO's 60 decision pairs) by exact
   match after normalising;
3. applies ``bpo data build``'s filters (BPO's word-ratio filter, leftover markers, answered-not-rewrote), our
   constraint check (a pair whose rewrite drops the user's explicit constraints would teach the optimizer to
   do so) and its exact/near-duplicate filter across the whole mix;
4. drops what is left that is a near copy of an evaluation or held-out prompt (MiniLM cosine >= 0.9), then
   applies the self-BLEU filter;
5. writes the mix, each source's kept pairs (the ablation arms are unions of them), CoachLM's preference
   triples, the held-out decision split (``heldout.jsonl``, for ``bpo eval``) and a report with every
   source's licence, rows kept and dropped (and why) and its style.

Keep-as-is rows are added by ``bpo train`` (``keep_as_is_fraction``), as for BPO's data alone.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from bpo_plugins.constraints import violations
from bpo_plugins.guards import word_count
from bpo_plugins.inputs import InputError, UsageError, read_rows
from bpo_plugins.training.build import dedupe, diversity_filter, filter_reason
from bpo_plugins.training.complement import complement
from bpo_plugins.training.data import Pair, Triplet, eval_prompts, normalise, read_pairs

__all__ = ["EVAL_SETS", "SOURCES", "NEAR_DUPLICATE_COSINE", "Source", "banned_prompts", "coachlm_triples", "mix", "mix_command",
           "style"]

#: A training prompt this close (MiniLM cosine) to an evaluation prompt is dropped.
NEAR_DUPLICATE_COSINE = 0.9
EVAL_SETS = ("tests/data/bpo/dolly_eval.json", "tests/data/bpo/self_instruct_eval.json", "tests/data/bpo/vicuna_eval.jsonl")

Converted = Iterator[tuple[Pair | None, str]]  # (pair, "") kept for filtering, (None, reason) dropped at conversion


@dataclass(frozen=True)
class Source:
    """A public source of rewrite pairs and what its licence lets us do with it."""

    name: str
    repository: str
    licence: str
    #: The licence lets us ship a model trained on it (no non-commercial or share-alike term on the rows we use).
    shippable: bool
    note: str
    read: Callable[[Path], Converted]


def _joined(*parts: str) -> str:
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def _read_bpo(path: Path) -> Converted:
    for pair in read_pairs([path]):
        yield Pair(pair.prompt, pair.optimized, pair.good_res, pair.bad_res, pair.context, "bpo"), ""


def _read_rephrase_and_respond(folder: Path) -> Converted:
    """uclaml/Rephrase-and-Respond ``data/<task>_<model>.json``: ``question`` -> ``refined_question``."""
    # GPT-4's rephrase first: where both models rephrased a question, the duplicate filter keeps the first.
    files = sorted((folder / "data" if (folder / "data").is_dir() else folder).glob("*.json"), key=lambda p: ("gpt-4" not in p.stem, p.stem))
    if not files:
        raise UsageError(f"{folder}: no Rephrase-and-Respond data/*.json files")
    for path in files:
        for row in read_rows(path):
            if path.stem.startswith("stereo"):
                # StereoSet's probes (CC BY-SA 4.0, share-alike): a bias test set, not user requests.
                yield None, "stereoset_cc_by_sa"
            elif isinstance(row.get("question"), str) and isinstance(row.get("refined_question"), str) and row["refined_question"].strip():
                yield Pair(row["question"].strip(), row["refined_question"].strip(), source=f"rephrase-and-respond:{path.stem}"), ""
            else:
                yield None, "no_rewrite"


def _coachlm_rows(folder: Path) -> list[dict[str, Any]]:
    path = next((p for p in (folder / "Expert Revision Dataset.json", folder / "expert_revision_dataset.json") if p.is_file()), folder)
    if not path.is_file():
        raise UsageError(f"{folder}: no CoachLM 'Expert Revision Dataset.json'")
    rows = list(read_rows(path))
    fields = ("Raw Instruction", "Raw Input", "Raw Response", "Revised Instruction", "Revised Input", "Revised Response")
    for i, row in enumerate(rows):
        if not all(isinstance(row.get(f), str) for f in fields):
            raise InputError(path, f"row {i + 1} lacks one of {', '.join(fields)}")
    return rows


def _read_coachlm(folder: Path) -> Converted:
    """lunyiliu/CoachLM's expert revisions of Alpaca rows: the revised instruction (and input) is the rewrite;
    the revised response is preferred to the raw one (good_res / bad_res)."""
    for row in _coachlm_rows(folder):
        prompt = _joined(row["Raw Instruction"], row["Raw Input"])
        optimized = _joined(row["Revised Instruction"], row["Revised Input"])
        if normalise(prompt) == normalise(optimized):
            yield None, "instruction_not_revised"  # only its response was revised: a preference triple, not a rewrite
        else:
            yield Pair(prompt, optimized, row["Revised Response"], row["Raw Response"], source="coachlm"), ""


def coachlm_triples(folder: Path) -> list[Triplet]:
    """CoachLM's revised responses as preference triples (prompt, chosen = revised, rejected = raw), for DPO."""
    return [Triplet(row["Raw Instruction"].strip(), row["Revised Response"], row["Raw Response"], row["Raw Input"].strip() or None, "coachlm")
            for row in _coachlm_rows(folder) if row["Revised Response"].strip() != row["Raw Response"].strip()]


def _csv_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)  # the rewrites run to several pages
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise InputError(path, f"no column {', '.join(sorted(missing))}", 1)
        yield from reader


def _read_oneprompted(folder: Path) -> Converted:
    """megemann/oneprompted: V1 ``bad_prompt`` -> ``good_prompt`` (written by Gemini 2.0 Flash), V2 ShareGPT
    ``instruction`` -> ``improved_instruction`` (by a tuned Gemini)."""
    v1 = folder / "Prompt_Training_V1" / "LLM_Generated_Training_Examples.csv"
    v2 = [folder / "Prompt_Training_V2" / name for name in ("labeled_train_final.csv", "labeled_validation_final.csv")]
    if not v1.is_file() and not any(p.is_file() for p in v2):
        raise UsageError(f"{folder}: no oneprompted Prompt_Training_V1/ or Prompt_Training_V2/ CSV files")
    if v1.is_file():
        for row in _csv_rows(v1, ("bad_prompt", "good_prompt")):
            yield Pair(row["bad_prompt"].strip(), row["good_prompt"].strip(), source="oneprompted:v1"), ""
    for path in (p for p in v2 if p.is_file()):
        for row in _csv_rows(path, ("instruction", "context", "improved_instruction")):
            if row["context"].strip():
                # bpo train learns prompt -> rewrite without the context, and these rewrites rarely carry it.
                yield None, "has_context"
            else:
                yield Pair(row["instruction"].strip(), row["improved_instruction"].strip(), source="oneprompted:v2"), ""


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("bpo", "THUDM/BPO (validation split, via ../shared/data/bpo)", "Apache-2.0 (BPO dataset card)", True,
           "gpt-3.5-turbo rewrites of OASST1, HH-RLHF, Alpaca-GPT4 and Chatbot Arena prompts", _read_bpo),
    Source("rephrase-and-respond", "github uclaml/Rephrase-and-Respond data/", "MIT (LICENSE)", True,
           "GPT-4 / gpt-3.5-turbo clarifying rephrases of benchmark questions (CSQA, BIG-bench date and sports, "
           "last-letter, coin flip, birthdate); StereoSet rows excluded (CC BY-SA 4.0)", _read_rephrase_and_respond),
    Source("coachlm", "github lunyiliu/CoachLM 'Expert Revision Dataset.json'", "Apache-2.0 (LICENSE), but the rows are "
           "Alpaca-52k's (CC BY-NC 4.0, tatsu-lab/stanford_alpaca DATA_LICENSE)", False,
           "expert revisions of Alpaca instructions and responses; research runs only (--allow-noncommercial)", _read_coachlm),
    Source("oneprompted", "github megemann/oneprompted data/Prompt_Training_V1, V2", "MIT, stated in its README only "
           "(the LICENSE file it points to is not in the repository)", True,
           "Gemini-written rewrites: V1 of synthetic prompts, V2 of ShareGPT52K user prompts (CC0 card)", _read_oneprompted),
)}


# --- keeping evaluation data out ---------------------------------------------------------------


def banned_prompts(eval_sets: Sequence[str | Path], heldout_from: str | Path | None) -> dict[str, set[str]]:
    """Normalised prompts no training pair may match: {"eval": evaluation sets, "heldout": the decision split}."""
    banned = {"eval": eval_prompts(eval_sets), "heldout": set()}
    if heldout_from is not None:
        from bpo_plugins.training.selfplay import heldout_split

        banned["heldout"] = {normalise(p.prompt) for p in heldout_split(heldout_from, 0.2, 42)[1]}
    return banned


def _exact_reason(prompt: str, banned: dict[str, set[str]]) -> str:
    return next((f"{label}_exact" for label, keys in banned.items() if normalise(prompt) in keys), "")


def _near_reasons(prompts: Sequence[str], banned: dict[str, set[str]], embedder: Any, threshold: float) -> list[str]:
    """Per prompt: "" or the split it is a near copy of ("eval_near", "heldout_near"), by MiniLM cosine.
    Each distinct text is encoded once, the banned ones first."""
    import numpy as np

    labelled = [(label, key) for label, keys in banned.items() for key in sorted(keys)]
    if not labelled or not prompts or embedder is None:
        return [""] * len(prompts)

    def encode(texts: Sequence[str]) -> Any:
        return np.concatenate([embedder.encode(list(texts[i : i + 64])) for i in range(0, len(texts), 64)])

    banned_vectors = encode([k for _, k in labelled])
    distinct = sorted({normalise(p) for p in prompts})
    sims = encode(distinct) @ banned_vectors.T
    best = sims.argmax(axis=1)
    reason = {text: f"{labelled[b][0]}_near" if row[b] >= threshold else "" for text, row, b in zip(distinct, sims, best)}
    return [reason[normalise(p)] for p in prompts]


# --- style ------------------------------------------------------------------------------------


def style(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Length ratio (rewrite words / prompt words), the share kept as is, the share that keeps the prompt
    verbatim and only adds to it, and the median lengths in words."""
    if not pairs:
        return {"rows": 0}
    ratios = sorted(word_count(p.optimized) / max(word_count(p.prompt), 1) for p in pairs)
    unchanged = sum(normalise(p.prompt) == normalise(p.optimized) for p in pairs)
    adds_only = sum(normalise(p.prompt) != normalise(p.optimized) and normalise(p.prompt) in normalise(p.optimized) for p in pairs)

    def at(q: float) -> float:
        return round(ratios[min(int(q * len(ratios)), len(ratios) - 1)], 2)

    return {"rows": len(pairs), "length_ratio": {"p10": at(0.1), "median": round(statistics.median(ratios), 2), "p90": at(0.9),
                                                 "mean": round(statistics.fmean(ratios), 2)},
            "unchanged": round(unchanged / len(pairs), 4), "only_adds": round(adds_only / len(pairs), 4),
            "median_prompt_words": statistics.median(word_count(p.prompt) for p in pairs),
            "median_rewrite_words": statistics.median(word_count(p.optimized) for p in pairs)}


# --- the mix ----------------------------------------------------------------------------------


def mix(sources: dict[str, Path], out: Path, *, eval_sets: Sequence[str | Path] = EVAL_SETS, heldout_from: str | Path | None = None,
        allow_noncommercial: bool = False, embedder: Any = None, near_cosine: float = NEAR_DUPLICATE_COSINE,
        check_constraints: bool = True, near_duplicate: float = 0.8, max_self_bleu: float = 0.6,
        as_complement: bool = False) -> dict[str, Any]:
    """Convert, clean and write every source; returns the report (also ``out/report.json``). With
    ``as_complement`` every kept pair's target becomes its untouched prompt plus what the rewrite adds
    (``training/complement.py``), and a pair whose rewrite adds no new sentence is dropped; the filters still judge the
    source's own rewrite."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise UsageError(f"unknown source {', '.join(sorted(unknown))}: use {', '.join(SOURCES)}")
    refused = [n for n in sources if not SOURCES[n].shippable and not allow_noncommercial]
    if refused:
        raise UsageError(f"{', '.join(refused)}: its licence does not let us ship a model trained on it "
                         f"({SOURCES[refused[0]].licence}); add --allow-noncommercial for a research run")
    for name, path in sources.items():
        if not path.exists():
            raise UsageError(f"--source {name}={path}: no such file or folder")
    report: dict[str, Any] = {"sources": {}, "eval_sets": [str(p) for p in eval_sets], "heldout_from": heldout_from and str(heldout_from),
                              "near_cosine": near_cosine, "shippable": all(SOURCES[n].shippable for n in sources)}
    banned = banned_prompts(eval_sets, heldout_from)
    report["banned_prompts"] = {label: len(keys) for label, keys in banned.items()}
    candidates: list[Pair] = []
    dropped: dict[str, Counter[str]] = {}
    read: dict[str, int] = {}
    for name, path in sources.items():
        dropped[name] = Counter()
        converted = list(SOURCES[name].read(path))
        read[name] = len(converted)
        pairs = []
        for pair, reason in converted:
            if pair is None:
                dropped[name][reason] += 1
            elif not pair.prompt.strip() or not pair.optimized.strip():
                dropped[name]["empty"] += 1
            else:
                pairs.append(pair)
        for pair in pairs:
            # Cheap checks first; MiniLM then reads only what is left (2 shared cores: tens of minutes otherwise).
            reason = _exact_reason(pair.prompt, banned) or filter_reason(pair.prompt, pair.optimized) or ""
            if not reason and check_constraints and violations(pair.prompt, pair.optimized):
                reason = "constraint_lost"
            if reason:
                dropped[name][reason] += 1
            else:
                candidates.append(pair)
    kept, n_exact, n_near = dedupe(candidates, near_duplicate)  # BPO comes first, so its pairs win a tie
    kept_ids = {id(p) for p in kept}
    for pair in candidates:
        if id(pair) not in kept_ids:
            dropped[_name(pair)]["duplicate"] += 1
    clean = []
    for pair, reason in zip(kept, _near_reasons([p.prompt for p in kept], banned, embedder, near_cosine)):
        if reason:
            dropped[_name(pair)][reason] += 1
        else:
            clean.append(pair)
    kept, _ = diversity_filter(clean, max_self_bleu)
    diverse_ids = {id(p) for p in kept}
    for pair in clean:
        if id(pair) not in diverse_ids:
            dropped[_name(pair)]["self_bleu"] += 1
    report["duplicates"] = {"exact": n_exact, "near": n_near}
    report["complement"] = as_complement
    if as_complement:
        # A rewrite that adds no new sentence leaves nothing to learn: as keep-as-is rows (57% of BPO's) they
        # taught the optimizer to copy (3% of held-out prompts changed; training/results/v2/README.md). bpo train
        # adds keep-as-is rows of its own (keep_as_is_fraction).
        targets = []
        for pair in kept:
            target = complement(pair)
            if normalise(target.optimized) == normalise(pair.prompt):
                dropped[_name(pair)]["complement_adds_nothing"] += 1
            else:
                targets.append(target)
        kept = targets
    out.mkdir(parents=True, exist_ok=True)
    (out / "sources").mkdir(exist_ok=True)
    _write(out / "pairs.jsonl", kept)
    for name in sources:
        mine = [p for p in kept if _name(p) == name]
        _write(out / "sources" / f"{name}.jsonl", mine)
        source = SOURCES[name]
        report["sources"][name] = {
            "repository": source.repository, "licence": source.licence, "shippable": source.shippable, "note": source.note,
            "path": str(sources[name]), "read": read[name], "kept": len(mine), "dropped": dict(dropped[name].most_common()),
            "style_kept": style(mine), "by_part": dict(Counter(p.source for p in mine).most_common()),
        }
    if "coachlm" in sources:
        triples, triples_dropped = _clean_triples(coachlm_triples(sources["coachlm"]), banned, embedder, near_cosine)
        (out / "coachlm.triples.jsonl").write_text("".join(json.dumps(
            {"prompt": t.prompt, "context": t.context, "chosen": t.chosen, "rejected": t.rejected}, ensure_ascii=False) + "\n" for t in triples))
        report["sources"]["coachlm"]["preference_triples"] = len(triples)
        report["sources"]["coachlm"]["preference_dropped"] = dict(triples_dropped.most_common())
    if heldout_from is not None:
        from bpo_plugins.training.selfplay import heldout_split

        _write(out / "heldout.jsonl", heldout_split(heldout_from, 0.2, 42)[1])  # the decision split, for bpo eval
    report["kept"] = len(kept)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _clean_triples(triples: Sequence[Triplet], banned: dict[str, set[str]], embedder: Any,
                   near_cosine: float) -> tuple[list[Triplet], Counter[str]]:
    """The triples whose prompt is no eval or held-out prompt, exactly or nearly (the pairs' rule), and why each other was dropped."""
    dropped: Counter[str] = Counter()
    exact_ok = []
    for triple in triples:
        reason = _exact_reason(triple.prompt, banned)
        if reason:
            dropped[reason] += 1
        else:
            exact_ok.append(triple)
    kept = []
    for triple, reason in zip(exact_ok, _near_reasons([t.prompt for t in exact_ok], banned, embedder, near_cosine)):
        if reason:
            dropped[reason] += 1
        else:
            kept.append(triple)
    return kept, dropped


def _name(pair: Pair) -> str:
    return pair.source.split(":", 1)[0]


def _write(path: Path, pairs: Sequence[Pair]) -> None:
    path.write_text("".join(json.dumps({**p.to_bpo(), "source": p.source}, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")


def markdown(report: dict[str, Any]) -> str:
    lines = ["| source | licence | shippable | read | kept | dropped (why) | length ratio p10 / median / p90 | unchanged | only adds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["sources"].items():
        st = s["style_kept"]
        ratio = f"{st['length_ratio']['p10']} / {st['length_ratio']['median']} / {st['length_ratio']['p90']}" if st["rows"] else "-"
        why = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"| {name} | {s['licence']} | {'yes' if s['shippable'] else 'no'} | {s['read']} | {s['kept']} | {why} | {ratio} | "
                     f"{st.get('unchanged', 0):.1%} | {st.get('only_adds', 0):.1%} |")
    targets = "; targets: the untouched prompt plus what the rewrite adds" if report.get("complement") else ""
    return "\n".join(lines) + f"\n\nMix: {report['kept']} pairs ({'shippable' if report['shippable'] else 'research only: a source is not shippable'}{targets}).\n"


# --- command line -----------------------------------------------------------------------------


def mix_command(
    source: Annotated[list[str], typer.Option("--source", "-s", help=f"NAME=PATH, repeatable; NAME is one of {', '.join(SOURCES)}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder: pairs.jsonl, sources/NAME.jsonl, report.json/.md.")] = Path("runs/data/mix"),
    exclude: Annotated[list[Path] | None, typer.Option("--exclude", help="More evaluation sets kept out (Dolly, Self-Instruct and Vicuna always are), e.g. BPO's bpo_test.json.")] = None,
    heldout_from: Annotated[Path | None, typer.Option("--heldout-from", help="BPO pairs whose fixed 60-pair held-out split is kept out.")] = Path("tests/data/bpo/bpo_val.json"),
    allow_noncommercial: Annotated[bool, typer.Option("--allow-noncommercial", help="Admit sources a shipped model may not be trained on (research runs).")] = False,
    near_cosine: Annotated[float, typer.Option("--near-cosine", min=0.0, max=1.0, help="MiniLM cosine to an eval prompt that drops a pair.")] = NEAR_DUPLICATE_COSINE,
    as_complement: Annotated[bool, typer.Option("--complement", help="Targets become the untouched prompt plus the sentences the rewrite adds (the complement design); a rewrite that adds no new sentence is dropped.")] = False,
) -> None:
    """Public rewrite pairs from several sources, in bpo train's format: eval prompts out, BPO's filters applied."""
    parsed: dict[str, Path] = {}
    for item in source:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--source {item!r}: use NAME=PATH")
        parsed[name.strip()] = Path(path)
    sets = [*EVAL_SETS, *(str(p) for p in exclude or [])]
    for path in [*map(Path, sets), *([heldout_from] if heldout_from else [])]:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    from bpo_plugins.embeddings import Embedder

    report = mix(parsed, out, eval_sets=sets, heldout_from=heldout_from, allow_noncommercial=allow_noncommercial, embedder=Embedder(),
                 near_cosine=near_cosine, as_complement=as_complement)
    typer.echo(markdown(report))
    typer.echo(f"pairs in {out}/pairs.jsonl, per source in {out}/sources/, figures in {out}/report.json", err=True)
