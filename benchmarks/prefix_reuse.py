"""Rewrite latency with the template prefix's KV cache, against today's path, in one run (bpo-small).

    python benchmarks/prefix_reuse.py --limit 80

Every rewrite starts with the same ~46 tokens (SmolLM2's chat header and BPO's instruction). The
default runtime now prefills them once per loaded model and rewinds to them (``KVPrefixCache``), and
runs one GenAI thread per usable core. For each Vicuna prompt, greedy rewrites through the Rewriter
(guards on, caches off) take turns across the arms, so this machine's drifting speed hits them alike:

- ``before``: GenAI int4 as it shipped, one intra-op thread, the whole prompt prefilled;
- ``threads``: a thread per core, the whole prompt prefilled;
- ``threads + prefix KV``: the default now.

It also checks that reuse changes nothing: each rewrite from a warm cache is compared with the same
rewrite from a cold one (cache dropped first), and with the whole-prompt prefill. The transformers
runtime (``--transformers N``, fewer prompts: it is 4x slower) gets the same with and without reuse.
Figures go to ``benchmarks/results/prefix_reuse.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def take_turns(prompts: list[str], arms: dict[str, Callable[[str], object]]) -> dict[str, list[float]]:
    from tqdm import tqdm

    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for prompt in tqdm(prompts, desc="rewrites", unit="prompt"):
        for name, run in arms.items():
            start = time.perf_counter()
            run(prompt)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def summary(seconds: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    base = statistics.median(seconds[baseline])
    return {name: {"p50_s": round(statistics.median(v), 4), "p95_s": round(percentile(v, 0.95), 4),
                   "mean_s": round(statistics.mean(v), 4), "x_faster_p50": round(base / statistics.median(v), 2)}
            for name, v in seconds.items()}


def identity(rewriter, prompts: list[str]) -> dict[str, int]:
    """How many greedy rewrites from a warm cache equal a cold start, and the whole-prompt prefill."""
    backend = rewriter.backend
    warm = [rewriter.rewrite(p).candidates for p in prompts]
    cold = []
    for p in prompts:
        backend.forget_prefix()
        cold.append(rewriter.rewrite(p).candidates)
    backend.reuse_prefix = False
    whole = [rewriter.rewrite(p).candidates for p in prompts]
    backend.reuse_prefix = True
    return {"prompts": len(prompts), "warm_equals_cold": sum(w == c for w, c in zip(warm, cold)),
            "warm_equals_whole_prompt_prefill": sum(w == h for w, h in zip(warm, whole))}


def one_thread_backend(default):
    """The default GenAI backend as it shipped: the export's own session options (one intra-op thread)."""
    import onnxruntime_genai as og

    from bpo_plugins.backends.genai import GenAIBackend
    from bpo_plugins.registry import default_export, resolve

    folder = default_export(resolve("bpo-small"))
    backend = GenAIBackend(og.Model(str(folder)), default.backend.tokenizer, pad_token_id=default.backend.pad_token_id,
                           model_id=default.backend.model_id, revision=default.backend.revision,
                           template=default.backend.default_template)
    backend.reuse_prefix = False
    return backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=ROOT.parent / "shared" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--limit", type=int, default=80)
    parser.add_argument("--transformers", type=int, default=20, help="prompts for the transformers runtime (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_reuse")
    args = parser.parse_args()

    from bpo_plugins import Rewriter
    from bpo_plugins.cli import read_rows, row_prompt

    prompts = [row_prompt(r) for r in read_rows(args.prompts)[: args.limit]]
    default = Rewriter.default(cache_size=0).warmup()
    before = Rewriter(one_thread_backend(default), guards=default.guards, cache_size=0)
    arms = {
        "before (1 thread, whole prompt)": before.rewrite,
        "threads, whole prompt": lambda p: _without_reuse(default, p),
        "threads + prefix KV (default)": default.rewrite,
    }
    figures: dict[str, object] = {"prompts": len(prompts), "runtime": default.backend.name,
                                  "prefix_tokens": len(default.backend.template_prefix(default.template, default.template.raw is not None)),
                                  "default_runtime": summary(take_turns(prompts, arms), "before (1 thread, whole prompt)"),
                                  "default_runtime_identity": identity(default, prompts)}
    if args.transformers:
        torch_rewriter = Rewriter.from_pretrained("bpo-small", backend="transformers", cache_size=0).warmup()
        few = prompts[: args.transformers]
        torch_arms = {"transformers, whole prompt": lambda p: _without_reuse(torch_rewriter, p),
                      "transformers + prefix KV": torch_rewriter.rewrite}
        figures["transformers"] = summary(take_turns(few, torch_arms), "transformers, whole prompt")
        figures["transformers_identity"] = identity(torch_rewriter, few)
    write(figures, args.out)


def _without_reuse(rewriter, prompt: str) -> object:
    rewriter.backend.reuse_prefix = False
    try:
        return rewriter.rewrite(prompt)
    finally:
        rewriter.backend.reuse_prefix = True


def write(figures: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [f"# Template prefix KV reuse ({figures['prompts']} Vicuna prompts, greedy, guards on, turns taken)", "",
             f"The prefix is {figures['prefix_tokens']} tokens.", "",
             "| runtime | p50 s | p95 s | mean s | x faster (p50) |", "|---|---|---|---|---|"]
    for section in ("default_runtime", "transformers"):
        for name, row in figures.get(section, {}).items():
            lines.append(f"| {name} | {row['p50_s']} | {row['p95_s']} | {row['mean_s']} | {row['x_faster_p50']} |")
    lines.append("")
    for section in ("default_runtime_identity", "transformers_identity"):
        if section in figures:
            same = figures[section]
            lines.append(f"- {section.replace('_identity', '').replace('_', ' ')}: warm cache = cold start on "
                         f"{same['warm_equals_cold']}/{same['prompts']} greedy rewrites; = whole-prompt prefill on "
                         f"{same['warm_equals_whole_prompt_prefill']}/{same['prompts']}.")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
