"""Rewrite-latency benchmark: p50/p95, decode tokens/s and peak memory for one backend."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bpo_plugins.rewriter import Rewriter


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux VmHWM, which (unlike ru_maxrss) does not
    carry over a parent's peak through fork and exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[rank]


def run_benchmark(rewriter: Rewriter, prompts: Sequence[str], *, batch_size: int = 1) -> dict[str, Any]:
    """Time ``rewrite_batch`` over ``prompts`` after loading and one warm-up call."""
    from tqdm import tqdm

    start = time.perf_counter()
    rewriter.warmup()
    load_s = time.perf_counter() - start
    rewriter.rewrite_batch(list(prompts[:1]))
    latencies: list[float] = []
    tokens = 0
    fallbacks = 0
    busy = 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc="bench", unit="batch"):
        chunk = list(prompts[i : i + batch_size])
        t0 = time.perf_counter()
        results = rewriter.rewrite_batch(chunk)
        elapsed = time.perf_counter() - t0
        busy += elapsed
        latencies.append(elapsed)
        tokens += sum(r.output_tokens for r in results)
        fallbacks += sum(r.fallback is not None for r in results)
    return {
        "n": len(prompts),
        "batch_size": batch_size,
        "load_s": round(load_s, 3),
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else 0.0,
        "latency_p95_s": round(percentile(latencies, 0.95), 4),
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else 0.0,
        "tokens_per_s": round(tokens / busy, 2) if busy else 0.0,
        "prompts_per_s": round(len(prompts) / busy, 3) if busy else 0.0,
        "output_tokens": tokens,
        "fallback_rate": round(fallbacks / max(len(prompts), 1), 4),
        "peak_rss_mb": peak_rss_mb(),
    }
