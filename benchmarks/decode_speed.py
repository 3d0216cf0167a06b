"""Decode speed as the export issue defines it: a 64-token greedy decode at batch 1, prefill timed apart.

`benchmarks/runtimes.py` times whole rewrites (prefill + decode + guards) through the Rewriter; this
script isolates the decode loop, where a runtime's per-token cost shows. Every runtime decodes exactly
64 tokens (end-of-sequence suppressed) from the same rendered bpo-small prompts. Time to first token
is the prefill; decode tok/s is the remaining 63 tokens over the time after it.

The runtimes take turns on each prompt (round-robin), so a shared VM's drifting speed hits them alike
and the ratios hold even when the absolute figures move. The machine's memory read bandwidth is
measured too, and each row says how many GB/s of weights it streamed: tok/s x the weight bytes one
decode step reads (every weight but the gathered embedding table).

    python benchmarks/decode_speed.py --limit 12 --rounds 2 --out benchmarks/results/decode_speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from runtimes import BANDWIDTH_BOUND_TOK_S, export_folder

TOKENS = 64

Runner = Callable[[list[int]], tuple[float, float]]  # ids -> (time to first token, time for the rest)


def hf_runner(model: object) -> Runner:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: object) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(ids: list[int]) -> tuple[float, float]:
        clock = Clock()
        tensor = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=TOKENS, min_new_tokens=TOKENS,  # type: ignore[attr-defined]
                           do_sample=False, streamer=clock, pad_token_id=0)
        first = clock.stamps[1]  # stamps[0] is the prompt itself
        return first - start, clock.stamps[-1] - first

    return run


def genai_runner(folder: Path) -> Runner:
    import numpy as np
    import onnxruntime_genai as og

    from bpo_plugins.backends.genai import load_genai_model

    model = load_genai_model(folder, "cpu")

    def run(ids: list[int]) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + TOKENS, min_length=len(ids) + TOKENS, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array([ids], dtype=np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(TOKENS - 1):
            generator.generate_next_token()
        return first - start, time.perf_counter() - first

    return run


def llama_cpp_runner(gguf: Path, eos: int) -> Runner:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=os.cpu_count() or 2, n_ctx=2048, verbose=False)

    def run(ids: list[int]) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.create_completion(ids, max_tokens=TOKENS, temperature=0, stream=True,
                                                                     logit_bias={eos: -1e9})]
        return stamps[0] - start, stamps[-1] - stamps[0]

    return run


def read_bandwidth_gb_s(megabytes: int = 512) -> float:
    """Best of 5 full reads of a buffer far larger than the caches, across all threads."""
    import torch

    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def onnx_weight_bytes(folder: Path) -> int:
    """Initializer bytes one decode step reads: all but tables that only feed Gathers (the embedding).

    A table may reach its Gather through a Transpose (GenAI's tied embeddings); ONNX Runtime folds
    that at load time, so it is still only gathered.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_gathered(name: str) -> bool:
        nodes = consumers.get(name, [])
        return bool(nodes) and all(
            (n.op_type == "Gather" and n.input[0] == name) or (n.op_type == "Transpose" and all(map(only_gathered, n.output)))
            for n in nodes
        )

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if not only_gathered(t.name))


def interleave(runners: dict[str, Runner], prompts: list[list[int]], rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Every runner on each prompt in turn; returns name -> (prefill seconds, decode seconds)."""
    from tqdm import tqdm

    for run in runners.values():
        run(prompts[0])  # warm-up: allocations, kernel selection
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    for step in tqdm(range(rounds * len(prompts)), desc="decode", unit="prompt"):
        ids = prompts[step % len(prompts)]
        for name, run in runners.items():
            first, rest = run(ids)
            times[name][0].append(first)
            times[name][1].append(rest)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed"))
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bpo_plugins.backends.onnx import load_export
    from bpo_plugins.inputs import read_prompt_rows, row_prompt
    from bpo_plugins.registry import find_smollm2_gguf, lookup

    entry = lookup("bpo-small")
    assert entry is not None
    exports = {(engine, precision): export_folder("bpo-small", engine, precision)
               for engine, precision in [("optimum", "int8"), ("genai", "fp32"), ("genai", "int8"), ("genai", "int4")]}
    backend = load_export(exports["genai", "int4"])
    texts = [backend.render(row_prompt(r), backend.default_template) for r in read_prompt_rows(args.prompts)[: args.limit]]
    prompts = [backend.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    eager = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(entry.path), str(entry.adapter)).merge_and_unload().eval()
    optimum = load_export(exports["optimum", "int8"])
    # name -> (precision, runner, weight bytes read per decoded token)
    setups: dict[str, tuple[str, Runner, int]] = {
        "transformers eager": ("fp32", hf_runner(eager), sum(p.numel() * p.element_size() for p in eager.parameters())),
        "onnxruntime optimum": ("int8", hf_runner(optimum.model), onnx_weight_bytes(exports["optimum", "int8"])),  # type: ignore[union-attr]
    }
    for precision in ("fp32", "int8", "int4"):
        folder = exports["genai", precision]
        setups[f"onnxruntime genai {precision}"] = (precision, genai_runner(folder), onnx_weight_bytes(folder))
    try:
        gguf = find_smollm2_gguf()
        setups["llama.cpp (base Q4_1 GGUF)"] = ("int4", llama_cpp_runner(gguf, backend.tokenizer.eos_token_id), gguf.stat().st_size)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row (pip install llama-cpp-python)")
    bandwidth = read_bandwidth_gb_s()
    times = interleave({name: runner for name, (_, runner, _) in setups.items()}, prompts, args.rounds)

    rows: list[dict[str, object]] = []
    for name, (precision, _, weight_bytes) in setups.items():
        prefill, decode = times[name]
        tok_s = (TOKENS - 1) * len(decode) / sum(decode)
        streamed = tok_s * weight_bytes / 1e9
        rows.append({"runtime": name, "precision": precision, "decode_tok_s": round(tok_s, 1),
                     "prefill_ms_p50": round(1000 * statistics.median(prefill), 1),
                     "pct_of_bandwidth_bound": round(100 * tok_s / BANDWIDTH_BOUND_TOK_S[precision], 1),
                     "weight_mb_per_token": round(weight_bytes / 1e6, 1), "streamed_gb_s": round(streamed, 1),
                     "pct_of_measured_bandwidth": round(100 * streamed / bandwidth, 1)})
    eager_tok_s = float(rows[0]["decode_tok_s"])  # type: ignore[arg-type]
    llama = next((float(r["decode_tok_s"]) for r in rows if str(r["runtime"]).startswith("llama.cpp")), None)  # type: ignore[arg-type]
    lines = [f"Measured read bandwidth: {bandwidth:.1f} GB/s. {len(prompts)} prompts x {args.rounds} rounds, runtimes interleaved.", "",
             "| runtime | precision | decode tok/s | x eager | x llama.cpp | % issue's bandwidth bound | weight MB/token | GB/s streamed | % measured bandwidth | prefill ms p50 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["x_eager"] = round(float(r["decode_tok_s"]) / eager_tok_s, 2)  # type: ignore[arg-type]
        r["x_llama_cpp"] = round(float(r["decode_tok_s"]) / llama, 2) if llama else None  # type: ignore[arg-type]
        lines.append(f"| {r['runtime']} | {r['precision']} | {r['decode_tok_s']} | {r['x_eager']} | {r['x_llama_cpp'] or ''} | "
                     f"{r['pct_of_bandwidth_bound']} | {r['weight_mb_per_token']} | {r['streamed_gb_s']} | "
                     f"{r['pct_of_measured_bandwidth']} | {r['prefill_ms_p50']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"tokens": TOKENS, "prompts": len(prompts), "rounds": args.rounds,
                                                         "read_bandwidth_gb_s": round(bandwidth, 1), "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
