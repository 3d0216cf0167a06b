"""Decode speed as the export issue defines it: a 64-token greedy decode at batch 1, prefill timed apart.

`benchmarks/runtimes.py` times whole rewrites (prefill + decode + guards) through the Rewriter; this
script isolates the decode loop, where a runtime's per-token cost shows. Every runtime decodes exactly
64 tokens (end-of-sequence suppressed) from the same rendered bpo-small prompts. Time to first token
is the prefill; decode tok/s is the remaining 63 tokens over the time after it.

    python benchmarks/decode_speed.py --limit 12 --out benchmarks/results/decode_speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

TOKENS = 64
#: The export issue's bandwidth-bound anchors for SmolLM2-135M on this 2-core machine (~20 GB/s).
BANDWIDTH_BOUND_TOK_S = {"fp32": 37.0, "int8": 150.0, "int4": 270.0}

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

    model = og.Model(str(folder))

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


def measure(name: str, precision: str, runner: Runner, prompts: list[list[int]]) -> dict[str, object]:
    runner(prompts[0])  # warm-up: allocations, kernel selection
    prefill, decode = zip(*(runner(ids) for ids in prompts))
    tok_s = (TOKENS - 1) * len(prompts) / sum(decode)
    row = {"runtime": name, "precision": precision, "decode_tok_s": round(tok_s, 1),
           "prefill_ms_p50": round(1000 * statistics.median(prefill), 1),
           "pct_of_bandwidth_bound": round(100 * tok_s / BANDWIDTH_BOUND_TOK_S[precision], 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=Path("../shared/data/bpo/vicuna_eval.jsonl"))
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from bpo_plugins.cli import read_rows, row_prompt
    from bpo_plugins.export.onnx import MANIFEST, export_onnx
    from bpo_plugins.registry import cache_dir, find_smollm2_gguf, resolve

    entry = resolve("bpo-small")
    assert entry is not None
    exports = {}
    for engine, precision in [("optimum", "int8"), ("genai", "fp32"), ("genai", "int8"), ("genai", "int4")]:
        folder = cache_dir() / "exports" / f"bpo-small-{engine}-{precision}"
        if not (folder / MANIFEST).is_file():
            export_onnx("bpo-small", folder, precision, engine=engine)
        exports[engine, precision] = folder
    from bpo_plugins.backends.onnx import load_export

    backend = load_export(exports["genai", "int4"])
    texts = [backend.render(row_prompt(r), backend.default_template) for r in read_rows(args.prompts)[: args.limit]]
    prompts = [backend.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    from peft import PeftModel

    eager = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(entry.path), str(entry.adapter)).merge_and_unload().eval()
    rows = [measure("transformers eager", "fp32", hf_runner(eager), prompts)]
    del eager
    optimum = load_export(exports["optimum", "int8"])
    rows.append(measure("onnxruntime optimum", "int8", hf_runner(optimum.model), prompts))  # type: ignore[union-attr]
    del optimum
    for precision in ("fp32", "int8", "int4"):
        rows.append(measure("onnxruntime genai", precision, genai_runner(exports["genai", precision]), prompts))
    try:
        rows.append(measure("llama.cpp (base Q4_1 GGUF)", "int4", llama_cpp_runner(find_smollm2_gguf(), backend.tokenizer.eos_token_id), prompts))
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row (pip install llama-cpp-python)")
    eager_tok_s = rows[0]["decode_tok_s"]
    llama = next((r["decode_tok_s"] for r in rows if str(r["runtime"]).startswith("llama.cpp")), None)
    lines = ["| runtime | precision | decode tok/s | x eager | x llama.cpp | % bandwidth bound | prefill ms p50 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        r["x_eager"] = round(float(r["decode_tok_s"]) / float(eager_tok_s), 2)  # type: ignore[arg-type]
        r["x_llama_cpp"] = round(float(r["decode_tok_s"]) / llama, 2) if llama else None  # type: ignore[arg-type]
        lines.append(f"| {r['runtime']} | {r['precision']} | {r['decode_tok_s']} | {r['x_eager']} | {r['x_llama_cpp'] or ''} | "
                     f"{r['pct_of_bandwidth_bound']} | {r['prefill_ms_p50']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"tokens": TOKENS, "prompts": len(prompts), "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
