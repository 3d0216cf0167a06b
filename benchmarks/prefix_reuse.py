"""Rewrite latency of the default runtime, step by step from what shipped, in one run (bpo-small).

    python benchmarks/prefix_reuse.py --limit 80

Every rewrite starts with the same ~46 tokens (SmolLM2's chat header and BPO's instruction), and a
rewrite copies spans of its prompt. The default runtime now runs a GenAI thread per usable core,
prefills the template prefix once per loaded model and rewinds to it (``KVPrefixCache``), and
drafts tokens from the prompt (prompt lookup) in greedy batch-1 decoding. For each Vicuna prompt,
greedy rewrites through the Rewriter (strict guards on, caches off) take turns across the arms, so
this machine's drifting speed hits them alike:

- ``shipped``: GenAI int4 as it shipped, one intra-op thread, the whole prompt prefilled;
- int8 (the default now) with each step added: threads, the prefix KV cache, prompt lookup;
- int4 with all of them (the faster, opt-in export).

It also checks what reuse changes: each default rewrite from a warm cache is compared with the same
rewrite from a cold one (cache dropped first), with the whole-prompt prefill, and without drafts.
The transformers runtime (``--transformers N``, fewer prompts: it is slower) gets the prefix
comparison too. Figures go to ``benchmarks/results/prefix_reuse.{json,md}``.
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
    """How many greedy rewrites from a warm cache equal a cold start, the whole-prompt prefill, and no drafts."""
    backend = rewriter.backend
    warm = [rewriter.rewrite(p).candidates for p in prompts]
    cold = []
    for p in prompts:
        backend.forget_prefix()
        cold.append(rewriter.rewrite(p).candidates)
    whole = [configured(rewriter, reuse=False)(p).candidates for p in prompts]
    figures = {"prompts": len(prompts), "warm_equals_cold": sum(w == c for w, c in zip(warm, cold)),
               "warm_equals_whole_prompt_prefill": sum(w == h for w, h in zip(warm, whole))}
    if backend.name == "onnx-genai":
        plain = [configured(rewriter, lookup=0)(p).candidates for p in prompts]
        figures["drafts_equal_no_drafts"] = sum(w == x for w, x in zip(warm, plain))
    return figures


def configured(rewriter, *, reuse: bool = True, lookup: int | None = None) -> Callable[[str], object]:
    """``rewriter.rewrite`` with the prefix cache and prompt lookup set for the call (arms share a backend)."""
    backend = rewriter.backend
    default_lookup = backend.prompt_lookup_tokens

    def run(prompt: str) -> object:
        backend.reuse_prefix, backend.prompt_lookup_tokens = reuse, default_lookup if lookup is None else lookup
        try:
            return rewriter.rewrite(prompt)
        finally:
            backend.reuse_prefix, backend.prompt_lookup_tokens = True, default_lookup

    return run


def shipped_backend():
    """The default GenAI runtime as it shipped (int4, the export's own session options: one intra-op
    thread, no prefix cache, no drafts), and the int4 export as it runs now."""
    import onnxruntime_genai as og
    from runtimes import export_folder

    from bpo_plugins.backends.genai import GenAIBackend
    from bpo_plugins.backends.onnx import load_export

    int4 = load_export(export_folder("bpo-small", "genai", "int4"))  # with the template its manifest names
    shipped = GenAIBackend(og.Model(str(export_folder("bpo-small", "genai", "int4"))), int4.tokenizer,
                           pad_token_id=int4.pad_token_id, model_id="bpo-small", revision=int4.revision,
                           template=int4.default_template)
    shipped.reuse_prefix, shipped.prompt_lookup_tokens = False, 0
    return shipped, int4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=ROOT / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--limit", type=int, default=80)
    parser.add_argument("--transformers", type=int, default=20, help="prompts for the transformers runtime (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_reuse")
    args = parser.parse_args()

    from bpo_plugins import Rewriter
    from bpo_plugins.inputs import read_prompt_rows, row_prompt

    prompts = [row_prompt(r) for r in read_prompt_rows(args.prompts)[: args.limit]]
    default = Rewriter.default(cache_size=0).warmup()
    shipped, int4 = shipped_backend()
    arms = {
        "shipped: int4, 1 thread, whole prompt": Rewriter(shipped, guards=default.guards, cache_size=0).rewrite,
        "int8, threads, whole prompt": configured(default, reuse=False, lookup=0),
        "int8, threads + prefix KV": configured(default, lookup=0),
        "int8, threads + prefix KV + prompt lookup (default)": default.rewrite,
        "int4, threads + prefix KV + prompt lookup": Rewriter(int4, guards=default.guards, cache_size=0).rewrite,
    }
    figures: dict[str, object] = {"prompts": len(prompts), "runtime": default.backend.name,
                                  "prefix_tokens": len(default.backend.template_prefix(default.template, default.template.raw is not None)),
                                  "draft_tokens": default.backend.prompt_lookup_tokens,
                                  "templates": {"default": default.template.name, "int4": int4.default_template.name},
                                  "default_runtime": summary(take_turns(prompts, arms), "shipped: int4, 1 thread, whole prompt"),
                                  "default_runtime_identity": identity(default, prompts)}
    if args.transformers:
        torch_rewriter = Rewriter.from_pretrained("bpo-small", backend="transformers", cache_size=0).warmup()
        few = prompts[: args.transformers]
        torch_arms = {"transformers, whole prompt": configured(torch_rewriter, reuse=False),
                      "transformers + prefix KV": torch_rewriter.rewrite}
        figures["transformers"] = summary(take_turns(few, torch_arms), "transformers, whole prompt")
        figures["transformers_identity"] = identity(torch_rewriter, few)
    write(figures, args.out)


def write(figures: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [f"# Rewrite latency, default runtime step by step ({figures['prompts']} Vicuna prompts, greedy, guards on, turns taken)", "",
             f"The prefix is {figures['prefix_tokens']} tokens; prompt lookup drafts up to {figures['draft_tokens']} tokens a step.", "",
             "| runtime | p50 s | p95 s | mean s | x faster (p50) |", "|---|---|---|---|---|"]
    templates = ", ".join(f"{k}: {v}" for k, v in figures["templates"].items())
    lines[2:2] = [f"Templates: {templates}.", ""]
    for section in ("default_runtime", "transformers"):
        for name, row in figures.get(section, {}).items():
            lines.append(f"| {name} | {row['p50_s']} | {row['p95_s']} | {row['mean_s']} | {row['x_faster_p50']} |")
    lines.append("")
    for section in ("default_runtime_identity", "transformers_identity"):
        if section in figures:
            same = figures[section]
            drafts = (f"; = no drafts on {same['drafts_equal_no_drafts']}/{same['prompts']}"
                      if "drafts_equal_no_drafts" in same else "")
            lines.append(f"- {section.replace('_identity', '').replace('_', ' ')}: warm cache = cold start on "
                         f"{same['warm_equals_cold']}/{same['prompts']} greedy rewrites; = whole-prompt prefill on "
                         f"{same['warm_equals_whole_prompt_prefill']}/{same['prompts']}{drafts}.")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
