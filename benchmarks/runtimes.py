"""Side-by-side runtimes for one optimizer: transformers eager, each ONNX precision, llama.cpp if installed.

Each runtime runs in its own process (`bpo bench`), so peak RSS is its own. Exports are built once
into the cache dir. Writes JSON and a Markdown table with ratios to transformers eager and llama.cpp.

    python benchmarks/runtimes.py --model bpo-small --prompts ../shared/data/bpo/vicuna_eval.jsonl \
        --limit 16 --batch-sizes 1 8 --out benchmarks/results/runtimes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def export_folder(model: str, precision: str) -> Path:
    from bpo_plugins.export.onnx import MANIFEST, export_onnx
    from bpo_plugins.registry import cache_dir

    folder = cache_dir() / "exports" / f"{Path(model).name}-{precision}"
    if not (folder / MANIFEST).is_file():
        export_onnx(model, folder, precision)
    return folder


def bench(model: str, backend: str, prompts: Path, limit: int, batch: int, max_new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "bpo_plugins", "bench", "--prompts", str(prompts), "--model", model, "--backend", backend,
               "--limit", str(limit), "--batch-size", str(batch), "--max-new-tokens", str(max_new_tokens), "--out", out.name]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bpo-small")
    parser.add_argument("--prompts", type=Path, default=Path("../shared/data/bpo/vicuna_eval.jsonl"))
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes"))
    args = parser.parse_args()

    runtimes: dict[str, tuple[str, str]] = {"transformers eager fp32": (args.model, "transformers")}
    for precision in args.precisions:
        runtimes[f"onnxruntime {precision}"] = (str(export_folder(args.model, precision)), "onnx")
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
    eager = {r["batch_size"]: r for r in rows if r["runtime"].startswith("transformers") and "error" not in r}
    for row in rows:
        base = eager.get(row.get("batch_size"))
        if base and "error" not in row and base["tokens_per_s"]:
            row["tok_s_vs_eager"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"model": args.model, "prompts": str(args.prompts), "rows": rows}, indent=2))
    lines = ["| runtime | batch | tok/s | x eager | latency p50 s | p95 s | prompts/s | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runtime']} | {r.get('batch_size', '')} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['runtime']} | {r['batch_size']} | {r['tokens_per_s']} | {r.get('tok_s_vs_eager', '')} | "
                         f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['prompts_per_s']} | {r['peak_rss_mb']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
