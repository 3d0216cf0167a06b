"""The gateway's own cost: latency added over calling the upstream directly, time to first token, throughput.

    python benchmarks/gateway.py --requests 400 --concurrency 1 64 200

Starts the test upstream (``tests/support/openai_server.py``, model ``echo``), a relay-only gateway
(``bpo proxy --no-rewrite``) and a rewriting gateway whose optimizer is the upstream's scripted model
(its latency is the rewrite's, measured alone in the same run). For each concurrency the three
targets are timed interleaved, round by round, so machine noise hits all alike. Added latency is the
gateway's percentile minus the direct one. Figures go to ``benchmarks/results/gateway.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "support" / "openai_server.py"


def start(command: list[str], pattern: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    sink = log.open("w")
    process = subprocess.Popen(command, stdout=sink, stderr=sink, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (match := re.search(pattern, log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:3]} did not start: {log.read_text()[-1000:]}")
        time.sleep(0.05)
    return process, match.group(1)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(client: httpx.AsyncClient, url: str, prompt: str, stream: bool) -> tuple[float, float]:
    """(total seconds, seconds to the first content chunk) for one chat request."""
    body = {"model": "echo", "messages": [{"role": "user", "content": prompt}], "stream": stream}
    start = time.perf_counter()
    if not stream:
        response = await client.post(url + "/chat/completions", json=body)
        response.raise_for_status()
        elapsed = time.perf_counter() - start
        return elapsed, elapsed
    first = 0.0
    async with client.stream("POST", url + "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not first and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - start
    return time.perf_counter() - start, first


async def round_of(client: httpx.AsyncClient, url: str, n: int, concurrency: int, stream: bool, tag: str) -> tuple[list[float], list[float], float]:
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[float, float]:
        async with limit:
            return await timed(client, url, f"{tag} request {i} {time.perf_counter_ns()}", stream)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    return [r[0] for r in results], [r[1] for r in results], n / wall


async def rewrite_alone(optimizer_url: str, n: int, concurrency: int) -> list[float]:
    from bpo_plugins import Rewriter

    rewriter = Rewriter.from_openai("script", base_url=optimizer_url, cache_size=0, max_concurrency=concurrency)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with limit:
            start = time.perf_counter()
            await rewriter.arewrite(f"Tell me about topic {i} {time.perf_counter_ns()}")
            return time.perf_counter() - start

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def measure(targets: dict[str, str], optimizer_url: str, requests: int, concurrencies: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for url in targets.values():  # warm every connection pool and code path once
            await round_of(client, url, 20, 4, True, "warmup")
        for concurrency in concurrencies:
            samples: dict[str, dict[str, list[float]]] = {k: {"latency": [], "ttft": [], "rps": []} for k in targets}
            for _ in range(rounds):
                for name, url in targets.items():  # interleaved: each round times every target
                    latency, _, rps = await round_of(client, url, requests // rounds, concurrency, False, name)
                    _, ttft, _ = await round_of(client, url, max(concurrency, requests // (4 * rounds)), concurrency, True, name)
                    samples[name]["latency"] += latency
                    samples[name]["ttft"] += ttft
                    samples[name]["rps"].append(rps)
            rewrite = await rewrite_alone(optimizer_url, min(requests, 200), concurrency)
            direct = samples["direct"]
            for name in ("relay", "rewrite"):
                s = samples[name]
                row = {
                    "gateway": name, "concurrency": concurrency, "requests": len(s["latency"]),
                    "direct_p50_ms": round(pct(direct["latency"], 0.5) * 1e3, 2), "direct_p99_ms": round(pct(direct["latency"], 0.99) * 1e3, 2),
                    "gateway_p50_ms": round(pct(s["latency"], 0.5) * 1e3, 2), "gateway_p99_ms": round(pct(s["latency"], 0.99) * 1e3, 2),
                    "added_p50_ms": round((pct(s["latency"], 0.5) - pct(direct["latency"], 0.5)) * 1e3, 2),
                    "added_p99_ms": round((pct(s["latency"], 0.99) - pct(direct["latency"], 0.99)) * 1e3, 2),
                    "ttft_added_p50_ms": round((pct(s["ttft"], 0.5) - pct(direct["ttft"], 0.5)) * 1e3, 2),
                    "gateway_rps": round(statistics.mean(s["rps"]), 1), "direct_rps": round(statistics.mean(direct["rps"]), 1),
                }
                if name == "rewrite":
                    row["rewrite_alone_p50_ms"] = round(pct(rewrite, 0.5) * 1e3, 2)
                    row["added_beyond_rewrite_p50_ms"] = round(row["added_p50_ms"] - row["rewrite_alone_p50_ms"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"`{command}`", "", "| gateway | concurrency | direct p50 ms | gateway p50 ms | added p50 ms | added p99 ms | TTFT added p50 ms | gateway req/s | direct req/s | rewrite alone p50 ms | added beyond rewrite p50 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gateway']} | {r['concurrency']} | {r['direct_p50_ms']} | {r['gateway_p50_ms']} | {r['added_p50_ms']} | {r['added_p99_ms']} | "
                     f"{r['ttft_added_p50_ms']} | {r['gateway_rps']} | {r['direct_rps']} | {r.get('rewrite_alone_p50_ms', '–')} | {r.get('added_beyond_rewrite_p50_ms', '–')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per target and concurrency (split over rounds)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 200])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bpo-gateway-bench-"))
    script = folder / "script.json"
    script.write_text("{}")  # the script model rewrites a prompt into the template's text: always a change
    processes = []
    try:
        upstream, port = start([sys.executable, str(SERVER), "--script", str(script)], r"PORT (\d+)", folder / "upstream.log")
        processes.append(upstream)
        upstream_url = f"http://127.0.0.1:{port}/v1"
        cli = [sys.executable, "-m", "bpo_plugins.cli", "proxy", "--upstream", upstream_url, "--port", "0"]
        relay, relay_url = start([*cli, "--no-rewrite"], r"at (http://\S+/v1)", folder / "relay.log")
        rewriting, rewrite_url = start([*cli, "--optimizer", "script", "--optimizer-base-url", upstream_url, "--rewrite-timeout", "30"],
                                       r"at (http://\S+/v1)", folder / "rewrite.log")
        processes += [relay, rewriting]
        targets = {"direct": upstream_url, "relay": relay_url, "rewrite": rewrite_url}
        rows = asyncio.run(measure(targets, upstream_url, args.requests, args.concurrency, args.rounds))
    finally:
        for process in processes:
            process.terminate()
    command = "python benchmarks/gateway.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
