"""How often rewrites drop or contradict the user's explicit constraints (issue 30 §3), and how often the
``constraint_lost`` guard would trip on BPO's own reference rewrites (its false-positive check).

For each set it counts the prompts that state a constraint (:func:`bpo_plugins.constraints.extract_constraints`),
then, for BPO's reference rewrites and for the optimizer's greedy rewrites of those prompts (the others cannot
lose one, so they are not rewritten), how many drop one ("lost") or contradict one ("inverted"). A prompt
whose constraint is both dropped and contradicted counts as contradicted. The optimizer runs with its shipped guards minus this one, so "sent" counts
the rewrites the shipped pipeline would have passed on; "raw" counts its first output before any guard.

    python training/constraint_figures.py --model bpo-small \\
        --bpo-test /work/sources/bpo-testset/bpo_test.json --out training/results/constraints
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from bpo_plugins.constraints import extract_constraints, violations
from bpo_plugins.guards import GuardConfig, clean_output

EVAL_SETS = ("tests/data/bpo/vicuna_eval.jsonl", "tests/data/bpo/self_instruct_eval.json", "tests/data/bpo/dolly_eval.json")


def _tally(pairs: list[tuple[str, str | None]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Figures for (prompt, rewrite) pairs; a None rewrite (a fallback) keeps every constraint."""
    with_constraints = lost = inverted = judged = 0
    kinds: Counter[str] = Counter()
    examples = []
    for prompt, rewrite in pairs:
        asked = extract_constraints(prompt)
        if not asked:
            continue
        with_constraints += 1
        if rewrite is None:
            continue
        judged += 1
        found = violations(prompt, rewrite)
        if not found:
            continue
        verdicts = {v.verdict for v in found}
        inverted += "inverted" in verdicts
        lost += "inverted" not in verdicts
        kinds.update(v.constraint.kind for v in found)
        examples.append({"prompt": prompt[:300], "rewrite": rewrite[:300], "why": [v.describe() for v in found]})
    figures = {
        "prompts": len(pairs), "with_constraints": with_constraints, "rewritten_with_constraints": judged,
        "dropped": lost, "inverted": inverted, "tripped": lost + inverted,
        "tripped_share_of_prompts": round((lost + inverted) / max(len(pairs), 1), 4),
        "tripped_share_of_constrained": round((lost + inverted) / max(with_constraints, 1), 4),
        "by_kind": dict(kinds),
    }
    return figures, examples


def _reference_pairs(path: Path) -> list[tuple[str, str | None]]:
    return [(row["prompt"], row["optimized_prompt"]) for row in json.loads(path.read_text(encoding="utf-8"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bpo-small")
    parser.add_argument("--bpo", type=Path, default=Path("tests/data/bpo/bpo_val.json"))
    parser.add_argument("--bpo-test", type=Path, help="thu-coai/BPO data/testset/bpo_test.json (200 pairs with references)")
    parser.add_argument("--no-model", action="store_true", help="BPO's reference rewrites only")
    parser.add_argument("--rows", type=Path, help="Re-count from a run's rows.jsonl instead of rewriting again")
    parser.add_argument("--rows-out", type=Path, default=Path("runs/constraints/rows.jsonl"),
                        help="Where the rewrites go (git-ignored: they hold evaluation prompts)")
    parser.add_argument("--out", type=Path, default=Path("training/results/constraints"))
    args = parser.parse_args()

    from bpo_plugins.training.evaluate import read_eval_set
    from bpo_plugins.training.selfplay import heldout_split

    _, heldout = heldout_split(args.bpo, 0.2, 42)
    sets: dict[str, list[tuple[str, str | None]]] = {"bpo-heldout-60": [(p.prompt, None) for p in heldout]}
    contexts: dict[str, list[str | None]] = {"bpo-heldout-60": [p.context for p in heldout]}
    references = {"bpo_val-300": _reference_pairs(args.bpo), "bpo-heldout-60": [(p.prompt, p.optimized) for p in heldout]}
    if args.bpo_test:
        references["bpo_test-200"] = _reference_pairs(args.bpo_test)
    for path in EVAL_SETS:
        items = read_eval_set(path)
        name = f"{Path(path).stem}-{len(items)}"
        sets[name], contexts[name] = [(i.prompt, None) for i in items], [i.context for i in items]

    made = f"python training/constraint_figures.py --model {args.model} --bpo-test {args.bpo_test} --out {args.out}"
    report: dict[str, Any] = {"command": made + (f" (re-counted from its rows: --rows {args.rows})" if args.rows else ""),
                              "references": {}, "optimizer": {}}
    examples: dict[str, Any] = {}
    for name, pairs in references.items():
        report["references"][name], examples[f"reference:{name}"] = _tally(pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = _rewrite(args.model, sets, contexts, args.rows_out) if args.rows is None and not args.no_model else (
        [json.loads(line) for line in args.rows.read_text().splitlines()] if args.rows else [])
    for name in sets:
        mine = [r for r in rows if r["set"] == name]
        if not mine:
            continue
        unconstrained = [(p, None) for p, _ in sets[name] if not extract_constraints(p)]
        sent = [(r["prompt"], r["sent"]) for r in mine] + unconstrained
        raw = [(r["prompt"], r["raw"]) for r in mine] + unconstrained
        sent_fig, examples[f"sent:{name}"] = _tally(sent)
        raw_fig, examples[f"raw:{name}"] = _tally(raw)
        report["optimizer"][name] = {"sent": sent_fig, "raw": raw_fig, "fallbacks_of_constrained": sum(r["fallback"] is not None for r in mine)}
    (args.out / "constraints.json").write_text(json.dumps(report, indent=2) + "\n")
    # BPO's test set is fetched, not vendored: its prompts stay out of the repository (counts only).
    examples = {k: v for k, v in examples.items() if "bpo_test" not in k}
    (args.out / "constraint_examples.json").write_text(json.dumps(examples, indent=2, ensure_ascii=False) + "\n")
    (args.out / "constraints.md").write_text(markdown(report))
    print(markdown(report))


def _rewrite(model: str, sets: dict[str, list[tuple[str, str | None]]], contexts: dict[str, list[str | None]], path: Path) -> list[dict[str, Any]]:
    """Greedy rewrites of every set with the shipped guards minus this one; each row also written to ``path``."""
    from bpo_plugins import Rewriter

    guards = dataclasses.replace(GuardConfig.strict(), check_constraints=False)
    rewriter = Rewriter.from_pretrained(model, mode="greedy", guards=guards, cache_size=0)
    # A rerun resumes: greedy rewrites already in ``path`` are read back, not made again.
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
    done = {(r["set"], r["prompt"]) for r in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as sink:
        for name, pairs in sets.items():
            # Only a prompt that states a constraint can lose one: the others are not rewritten (a few minutes, not an hour).
            prompts = [p for p, _ in pairs if extract_constraints(p) and (name, p) not in done]
            context_of = dict(zip((p for p, _ in pairs), contexts[name]))
            for start in range(0, len(prompts), 16):
                results = rewriter.rewrite_batch(prompts[start : start + 16], contexts=[context_of[p] for p in prompts[start : start + 16]])
                for prompt, result in zip(prompts[start : start + 16], results):
                    row = {"set": name, "prompt": prompt, "sent": result.rewritten if result.fallback is None and result.rewritten != prompt else None,
                           "raw": clean_output(result.candidates[0]) if result.candidates else None,
                           "fallback": result.fallback and result.fallback.value}
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    rows.append(row)
    return rows


def _row(name: str, fig: dict[str, Any]) -> str:
    return (f"| {name} | {fig['prompts']} | {fig['with_constraints']} | {fig['rewritten_with_constraints']} | {fig['dropped']} | "
            f"{fig['inverted']} | {fig['tripped_share_of_prompts']:.1%} | {fig['tripped_share_of_constrained']:.1%} |")


def markdown(report: dict[str, Any]) -> str:
    head = ("| set | prompts | state a constraint | rewritten (of those) | drop one | contradict one | tripped, of all prompts "
            "| tripped, of constrained |\n|---|---|---|---|---|---|---|---|")
    lines = ["# Explicit constraints kept by rewrites (`constraint_lost`)", "", f"Command: `{report['command']}`", "",
             "## BPO's reference rewrites (false-positive check: every trip is a rewrite BPO's data calls good)", "", head]
    lines += [_row(name, fig) for name, fig in report["references"].items()]
    for which, label in (("sent", "what the shipped pipeline sends on (strict guards, this one off)"), ("raw", "first output, before any guard")):
        if report["optimizer"]:
            lines += ["", f"## The optimizer, greedy: {label}", "", head]
            lines += [_row(name, figs[which]) for name, figs in report["optimizer"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
