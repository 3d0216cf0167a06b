"""What the MiniLM intent guard costs next to the rewrite it checks (bpo-small, default runtime).

    python benchmarks/intent_guard.py --limit 40

For each Vicuna prompt, one greedy rewrite with the intent guard off and one with it on, taking
turns (this machine's speed drifts), plus the guard's cosine alone. Caches are off, so every rewrite
runs the model. Figures go to ``benchmarks/results/intent_guard.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=ROOT / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "intent_guard")
    args = parser.parse_args()

    from bpo_plugins import Rewriter
    from bpo_plugins.embeddings import shared_embedder
    from bpo_plugins.inputs import read_prompt_rows, row_prompt

    prompts = [row_prompt(r) for r in read_prompt_rows(args.prompts)[: args.limit]]
    guarded = Rewriter.default(cache_size=0, max_new_tokens=96).warmup()
    assert guarded.guards.min_intent_cosine > 0
    unguarded = Rewriter(guarded.backend, guards=replace(guarded.guards, min_intent_cosine=0.0), cache_size=0, max_new_tokens=96)
    embedder = shared_embedder()
    embedder.cosine(["warm"], ["up"])
    timings: dict[str, list[float]] = {"rewrite, guard off": [], "rewrite, guard on": [], "cosine alone": []}
    for prompt in prompts:
        for name, run in (("rewrite, guard off", lambda p=prompt: unguarded.rewrite(p)),
                          ("rewrite, guard on", lambda p=prompt: guarded.rewrite(p)),
                          ("cosine alone", lambda p=prompt: embedder.cosine([p + " Answer in detail."], [p]))):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    p50 = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    figures = {"prompts": len(prompts), "p50_ms": {k: round(v, 1) for k, v in p50.items()},
               "guard_share_of_rewrite": round(p50["cosine alone"] / p50["rewrite, guard off"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [f"# Intent guard cost ({len(prompts)} Vicuna prompts, bpo-small default runtime, turns taken)", "",
             "| step | p50 ms |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in p50.items()], "",
             f"The guard's cosine is {100 * figures['guard_share_of_rewrite']:.1f}% of a rewrite's median time.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
