"""``bpo optimize --file``: prompts/s at batch 1 (single stream) and batch 8, and what the file path picks.

    python benchmarks/file_throughput.py --limit 32 --rounds 2

For each local runtime of bpo-small the same prompts are rewritten one at a time and in batches of 8,
taking turns round by round (this machine's speed drifts); caches are off. The file path's choice
(``bpo_plugins.batching.file_batch_size``: batch only where ``Backend.batch_speedup`` says batching pays)
must be at least as fast as the single stream. Figures go to ``benchmarks/results/file_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=ROOT / "tests" / "data" / "bpo" / "vicuna_eval.jsonl")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["auto", "transformers"])
    parser.add_argument("--ray-actors", type=int, nargs="*", default=[], help="Also time the Ray path with these actor counts.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "file_throughput")
    args = parser.parse_args()

    from bpo_plugins import Rewriter
    from bpo_plugins.batching import file_batch_size
    from bpo_plugins.inputs import read_prompt_rows, row_prompt

    prompts = [row_prompt(r) for r in read_prompt_rows(args.prompts)[: args.limit]]
    rewriters = {b: Rewriter.from_pretrained("bpo-small", backend=b, cache_size=0, max_new_tokens=96).warmup() for b in args.backends}
    seconds: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for name, rewriter in rewriters.items():
            for batch in (1, 8):
                start = time.perf_counter()
                for i in range(0, len(prompts), batch):
                    rewriter.rewrite_batch(prompts[i : i + batch])
                seconds[name, batch] = seconds.get((name, batch), 0.0) + time.perf_counter() - start
    rows = []
    for name, rewriter in rewriters.items():
        rate = {b: args.rounds * len(prompts) / seconds[name, b] for b in (1, 8)}
        pick = file_batch_size(rewriter)
        rows.append({"runtime": f"{rewriter.backend.name} ({name})", "batch_speedup_declared": rewriter.backend.batch_speedup,
                     "prompts_per_s_batch1": round(rate[1], 2), "prompts_per_s_batch8": round(rate[8], 2),
                     "file_path_batch": pick, "file_path_vs_single_stream": round(rate[pick] / rate[1], 2)})
    ray_rows = ray_rates(prompts, args.ray_actors, rows[0]["prompts_per_s_batch1"]) if args.ray_actors else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"prompts": len(prompts), "rounds": args.rounds, "rows": rows, "ray": ray_rows}, indent=2) + "\n")
    lines = [f"# bpo optimize --file throughput ({len(prompts)} Vicuna prompts x {args.rounds} rounds, greedy, max 96 new tokens)", "",
             "| runtime | declared batch speedup | prompts/s batch 1 | prompts/s batch 8 | file path batch | file path / single stream |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['runtime']} | {r['batch_speedup_declared']} | {r['prompts_per_s_batch1']} | {r['prompts_per_s_batch8']} | "
              f"{r['file_path_batch']} | {r['file_path_vs_single_stream']} |" for r in rows]
    if ray_rows:
        lines += ["", "Ray Data path (default runtime, one model per actor; the time includes starting Ray and loading the actors):", "",
                  "| actors | prompts/s | x local single stream |", "|---|---|---|"]
        lines += [f"| {r['actors']} | {r['prompts_per_s']} | {r['x_local_single_stream']} |" for r in ray_rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def ray_rates(prompts: list[str], actor_counts: list[int], local_rate: float) -> list[dict]:
    import ray

    from bpo_plugins.ray_data import rewrite_dataset

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    for actors in actor_counts:
        start = time.perf_counter()
        rewrite_dataset(ray.data.from_items([{"prompt": p} for p in prompts]), actors=actors, max_new_tokens=96).take_all()
        rate = len(prompts) / (time.perf_counter() - start)
        rows.append({"actors": actors, "prompts_per_s": round(rate, 2), "x_local_single_stream": round(rate / local_rate, 2)})
    ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
