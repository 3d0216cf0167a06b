"""Batch-1 decode on a GPU against the card's bandwidth bound: eager transformers vs the GPU runtime.

    python benchmarks/gpu_decode.py --tokens 128 --rounds 3

The GPU runtime is ``TransformersBackend`` on CUDA: bf16 weights, a static KV cache, and the decode
step compiled by transformers into CUDA graphs. Two models: the bundled bpo-small, and a randomly
initialised model of Llama-2-7B's shape (built here in bf16; no weights can be downloaded). Each
decodes ``--tokens`` tokens greedily (end-of-sequence suppressed); the decode time is a full run
minus a one-token run, so the prefill is taken out. Arms take turns on each round.

The bound is one read of the weights per token: bytes of every parameter but the embedding table
over the card's memory bandwidth (its spec sheet figure, and a measured device copy). It also times
whole bpo-small rewrites through the Rewriter on Vicuna prompts.

Without a CUDA device this prints why and exits 0: CI and the development machine have none.
Figures go to ``benchmarks/results/gpu_decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Spec-sheet HBM bandwidth, bytes/s, by the name torch reports.
CARD_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
                  "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12, "L40S": 0.864e12, "A10G": 0.6e12}


def card_bandwidth(name: str) -> float | None:
    for key in sorted(CARD_BANDWIDTH, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return CARD_BANDWIDTH[key]
    return None


def measured_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (it reads and writes each byte), best of 5."""
    import torch

    source = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def streamed_bytes(model) -> int:
    """Bytes one decode step reads: every parameter but the input embedding table (only gathered)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding or model.config.tie_word_embeddings)


def seven_b_shape():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig()  # its defaults are Llama-2-7B's shape: 32 x 4096, MLP 11008, vocab 32000
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def decode_seconds(backend, ids: list[int], tokens: int) -> float:
    """Seconds for ``tokens`` decode steps at batch 1: a full generate minus a one-token generate."""
    import torch

    vocab = backend.model.config.vocab_size  # the 7B shape has Llama-2's 32000, fewer than SmolLM2's tokenizer
    input_ids = torch.tensor([[i % vocab for i in ids]], device=backend.model.device)

    def run(n: int) -> float:
        cache = backend.static_cache_kwargs(1) if backend.static_cache_len else {}
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            backend.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0, **cache)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return run(tokens + 1) - run(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rewrites", type=int, default=20, help="Vicuna prompts for the rewrite latency")
    parser.add_argument("--prompts", type=Path, default=ROOT / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_decode: no CUDA device here, nothing to measure (run it on a GPU machine)", file=sys.stderr)
        return 0
    from bpo_plugins import Rewriter
    from bpo_plugins.backends.transformers import STATIC_CACHE_LEN, TransformersBackend
    from bpo_plugins.inputs import read_prompt_rows, row_prompt

    name = torch.cuda.get_device_name()
    spec, measured = card_bandwidth(name), measured_bandwidth()
    rewriter = Rewriter.from_pretrained("bpo-small", device="cuda", cache_size=0).warmup()
    small = rewriter.backend
    big = seven_b_shape()
    models = {"bpo-small": small, "llama-2-7b shape (random)": TransformersBackend(big, small.tokenizer, model_id="7b-shape",
                                                                                  static_cache_len=STATIC_CACHE_LEN)}
    ids = small.tokenizer(small.render("Tell me about Harry Potter", small.default_template), add_special_tokens=False)["input_ids"]
    rows = []
    for label, backend in models.items():
        eager = TransformersBackend(backend.model, backend.tokenizer, model_id=label, prompt_lookup_tokens=None, reuse_prefix=False)
        arms = {"eager, dynamic cache": eager, "static cache + compiled decode": backend}
        for arm in arms.values():  # compile, capture CUDA graphs, allocate caches
            decode_seconds(arm, ids, 8)
        seconds: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm, runner in arms.items():
                seconds[arm].append(decode_seconds(runner, ids, args.tokens))
        weight = streamed_bytes(backend.model)
        for arm, values in seconds.items():
            tok_s = args.tokens / min(values)
            rows.append({"model": label, "arm": arm, "decode_tok_s": round(tok_s, 1),
                         "weight_gb_per_token": round(weight / 1e9, 3),
                         "spec_bound_tok_s": round(spec / weight, 1) if spec else None,
                         "pct_of_spec_bound": round(100 * tok_s * weight / spec, 1) if spec else None,
                         "pct_of_measured_bandwidth": round(100 * tok_s * weight / measured, 1)})
    prompts = [row_prompt(r) for r in read_prompt_rows(args.prompts)[: args.rewrites]]
    latencies = []
    for prompt in prompts:
        start = time.perf_counter()
        rewriter.rewrite(prompt)
        latencies.append(time.perf_counter() - start)
    figures = {"device": name, "torch": torch.__version__, "spec_bandwidth_tb_s": spec and spec / 1e12,
               "measured_copy_bandwidth_tb_s": round(measured / 1e12, 3), "tokens": args.tokens, "rounds": args.rounds,
               "decode": rows, "bundled_rewrite_p50_ms": round(1000 * statistics.median(latencies), 1),
               "bundled_rewrite_max_ms": round(1000 * max(latencies), 1), "rewrites": len(prompts)}
    write(figures, args.out)
    return 0


def write(figures: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [f"# GPU decode, batch 1 ({figures['device']}, torch {figures['torch']})", "",
             f"Spec bandwidth {figures['spec_bandwidth_tb_s']} TB/s, measured copy {figures['measured_copy_bandwidth_tb_s']} TB/s; "
             f"{figures['tokens']} tokens x {figures['rounds']} rounds, best round.", "",
             "| model | arm | decode tok/s | GB read per token | spec bound tok/s | % of spec bound | % of measured bandwidth |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['arm']} | {r['decode_tok_s']} | {r['weight_gb_per_token']} | {r['spec_bound_tok_s']} | "
              f"{r['pct_of_spec_bound']} | {r['pct_of_measured_bandwidth']} |" for r in figures["decode"]]
    lines += ["", f"bpo-small rewrite through the Rewriter (guards on), {figures['rewrites']} Vicuna prompts: "
              f"p50 {figures['bundled_rewrite_p50_ms']} ms, max {figures['bundled_rewrite_max_ms']} ms.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
