"""Prompt-lookup decoding on the transformers backend: speed-up over plain greedy, and output identity.

    python benchmarks/prompt_lookup.py [--model bpo-small] [--prompts FILE] [--limit 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bpo_plugins import Rewriter
from bpo_plugins.inputs import read_prompt_rows, row_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bpo-small")
    parser.add_argument("--prompts", type=Path, action="append")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt_lookup.json"))
    args = parser.parse_args()
    files = args.prompts or [Path(__file__).resolve().parent.parent / "tests" / "data" / "bpo" / "vicuna_eval.jsonl", Path("training/results/bpo-small-val_pairs.jsonl")]
    prompts = [row_prompt(r) for f in files for r in read_prompt_rows(f)[: args.limit]]
    rewriter = Rewriter.from_pretrained(args.model, backend="transformers", cache_size=0).warmup()
    backend = rewriter.backend
    figures = {}
    outputs = {}
    for name, lookup in (("plain greedy", None), ("prompt lookup (10 draft tokens)", 10)):
        backend.prompt_lookup_tokens = lookup  # type: ignore[attr-defined]
        rewriter.rewrite(prompts[0])
        start = time.perf_counter()
        results = [rewriter.rewrite(p) for p in prompts]
        elapsed = time.perf_counter() - start
        tokens = sum(r.output_tokens for r in results)
        outputs[name] = [r.candidates for r in results]
        figures[name] = {"seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 2), "prompts": len(prompts)}
    plain, lookup = figures.values()
    report = {
        "model": args.model, "files": [str(f) for f in files], "figures": figures,
        "speedup": round(lookup["tokens_per_s"] / plain["tokens_per_s"], 3),
        "identical_outputs": outputs["plain greedy"] == outputs["prompt lookup (10 draft tokens)"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
