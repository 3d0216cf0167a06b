"""Side-by-side runtimes for one optimizer: transformers eager, each ONNX precision, llama.cpp if installed.

Each runtime runs in its own process (`bpo bench`), so peak RSS is its own. Exports are built once
into the cache dir. Writes JSON and a Markdown table with ratios to transformers eager and llama.cpp.

    python benchmarks/runtimes.py --model bpo-small --prompts tests/data/bpo/vicuna_eval.jsonl \
        --limit 32 --batch-sizes 1 8 32 --out benchmarks/results/runtimes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: Tokens/s if every weight byte read per decoded token came at the machine's memory bandwidth: the
#: export issue's anchors for SmolLM2-135M at about 20 GB/s (the embedding is gathered, not read).
BANDWIDTH_BOUND_TOK_S = {"fp32": 37.0, "int8": 150.0, "int4": 270.0}


def export_folder(model: str, engine: str, precision: str, block_size: int | None = None, int4_algo: str = "default") -> Path:
    """The cached export a benchmark runs, rebuilt when the export recipe changes."""
    from bpo_plugins.export.onnx import export_onnx
    from bpo_plugins.inputs import MANIFEST
    from bpo_plugins.onnx_export import BLOCK_SIZE, RECIPE_VERSION
    from bpo_plugins.registry import cache_dir

    # The default block size is the default export: one folder, not two copies of the same graph.
    block = f"-b{block_size}" if block_size and block_size != BLOCK_SIZE.get(precision) else ""
    algo = f"-{int4_algo}" if int4_algo != "default" else ""
    folder = cache_dir() / "exports" / f"{Path(model).name}-{engine}-{precision}{block}{algo}-r{RECIPE_VERSION}"
    if not (folder / MANIFEST).is_file():
        export_onnx(model, folder, precision, engine=engine, block_size=block_size, int4_algo=int4_algo)
    return folder


def bench(model: str, backend: str, prompts: Path, limit: int, batch: int, max_new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "bpo_plugins", "bench", "--prompts", str(prompts), "--model", model, "--backend", backend,
               "--limit", str(limit), "--batch-size", str(batch), "--max-new-tokens", str(max_new_tokens), "--out", out.name]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
        return json.loads(Path(out.name).read_text())


def llama_cpp_worker(prompts_file: Path, limit: int, max_new_tokens: int) -> None:
    """Batch-1 llama.cpp on the bundled base GGUF (Q4_1), BPO's instruction through its chat template."""
    import statistics
    import time

    from llama_cpp import Llama

    from bpo_plugins.bench import peak_rss_mb
    from bpo_plugins.inputs import read_prompt_rows, row_prompt
    from bpo_plugins.registry import find_smollm2_gguf
    from bpo_plugins.templates import BPO_CHAT

    llm = Llama(model_path=str(find_smollm2_gguf()), n_threads=os.cpu_count() or 2, n_ctx=2048, verbose=False)
    prompts = [row_prompt(r) for r in read_prompt_rows(prompts_file)[:limit]]
    llm.create_chat_completion(BPO_CHAT.messages(prompts[0]), max_tokens=8, temperature=0)
    latencies, tokens = [], 0
    for prompt in prompts:
        start = time.perf_counter()
        out = llm.create_chat_completion(BPO_CHAT.messages(prompt), max_tokens=max_new_tokens, temperature=0)
        latencies.append(time.perf_counter() - start)
        tokens += out["usage"]["completion_tokens"]
    print(json.dumps({
        "n": len(prompts), "batch_size": 1, "tokens_per_s": round(tokens / sum(latencies), 2),
        "latency_p50_s": round(statistics.median(latencies), 4), "latency_p95_s": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 4),
        "prompts_per_s": round(len(prompts) / sum(latencies), 3), "peak_rss_mb": peak_rss_mb(),
        "note": "base SmolLM2 Q4_1 GGUF (same architecture and size; the LoRA is not merged into it)",
    }))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--llama-cpp-worker":
        llama_cpp_worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bpo-small")
    parser.add_argument("--prompts", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--engines", nargs="+", default=["optimum", "genai"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes"))
    args = parser.parse_args()

    runtimes: dict[str, tuple[str, str]] = {"transformers eager fp32": (args.model, "transformers")}
    for engine in args.engines:
        for precision in args.precisions:
            runtimes[f"onnxruntime {engine} {precision}"] = (str(export_folder(args.model, engine, precision)), "onnx")
    rows = []
    for name, (model, backend) in runtimes.items():
        for batch in args.batch_sizes:
            figures = bench(model, backend, args.prompts, args.limit, batch, args.max_new_tokens)
            rows.append({"runtime": name, "batch_size": batch, **figures})
            print(name, batch, {k: figures.get(k) for k in ("tokens_per_s", "latency_p50_s", "prompts_per_s", "peak_rss_mb", "error")}, flush=True)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        rows.append({"runtime": "llama.cpp", "error": "llama-cpp-python not installed (pip install llama-cpp-python to compare)"})
    else:
        run = subprocess.run([sys.executable, __file__, "--llama-cpp-worker", str(args.prompts), str(args.limit), str(args.max_new_tokens)],
                             capture_output=True, text=True)
        figures = json.loads(run.stdout) if run.returncode == 0 else {"error": run.stderr.strip()[-300:]}
        rows.append({"runtime": "llama.cpp Q4_1", **figures})
        print("llama.cpp", figures, flush=True)
    llama = next((r for r in rows if r["runtime"].startswith("llama.cpp") and "error" not in r), None)
    eager = {r["batch_size"]: r for r in rows if r["runtime"].startswith("transformers") and "error" not in r}
    for row in rows:
        base = eager.get(row.get("batch_size"))
        if base and "error" not in row and base["tokens_per_s"]:
            row["tok_s_vs_eager"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
        if llama and "error" not in row:
            row["tok_s_vs_llama_cpp"] = round(row["tokens_per_s"] / llama["tokens_per_s"], 2)
        precision = "int4" if row["runtime"].startswith("llama.cpp") else row["runtime"].split()[-1]
        if "error" not in row and row.get("batch_size") == 1 and precision in BANDWIDTH_BOUND_TOK_S:
            row["pct_of_bandwidth_bound"] = round(100 * row["tokens_per_s"] / BANDWIDTH_BOUND_TOK_S[precision], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": args.model, "prompts": str(args.prompts), "rows": rows}, indent=2))
    batch_one = {r["runtime"]: r["prompts_per_s"] for r in rows if r.get("batch_size") == 1 and "error" not in r}
    lines = ["| runtime | batch | tok/s | x eager | x llama.cpp | % bandwidth bound | latency p50 s | p95 s | prompts/s | x batch 1 | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runtime']} | {r.get('batch_size', '')} | {r['error']} | | | | | | | | |")
        else:
            scale = round(r["prompts_per_s"] / batch_one[r["runtime"]], 2) if batch_one.get(r["runtime"]) else ""
            lines.append(f"| {r['runtime']} | {r['batch_size']} | {r['tokens_per_s']} | {r.get('tok_s_vs_eager', '')} | {r.get('tok_s_vs_llama_cpp', '')} | "
                         f"{r.get('pct_of_bandwidth_bound', '')} | {r['latency_p50_s']} | {r['latency_p95_s']} | {r['prompts_per_s']} | {scale} | {r['peak_rss_mb']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
