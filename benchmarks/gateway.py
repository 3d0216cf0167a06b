"""The gateway's own cost: latency added over calling the upstream directly, time to first token, throughput.

    python benchmarks/gateway.py --seconds 5 --rounds 3 --concurrency 1 64 200   # needs wrk: apt-get install wrk

Starts the test upstream (``tests/support/openai_server.py``, model ``echo``), a relay-only gateway
(``bpo proxy --no-rewrite``) and a rewriting gateway whose optimizer is the upstream's scripted model.
Load comes from wrk (C, one thread), not Python: a Python load generator on 2 cores saturates before
the servers do. Every request carries a new prompt, so no cache answers. For each concurrency the
targets (and one bare optimizer call, the rewrite's floor) are timed interleaved, round by round, and
each figure is the median over rounds. Added latency is the gateway's percentile minus the direct
one; time to first token is measured one stream at a time. Figures go to
``benchmarks/results/gateway.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
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


#: wrk sends a different prompt each request, so no cache (the gateway's, the rewriter's) answers for it.
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local text = "wrk request " .. counter .. " " .. math.random(1000000000)
  local body = '{"model": "MODEL", "messages": [SYSTEM{"role": "user", "content": "' .. text .. '"}]}'
  return wrk.format("POST", "/v1/chat/completions", {["Content-Type"] = "application/json"}, body)
end
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, concurrency: int, seconds: int, script: Path) -> dict[str, float]:
    """p50 / p99 latency (ms) and requests/s of one wrk run; any non-2xx answer fails the benchmark."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "--latency", "-s", str(script), url.removesuffix("/v1")]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests against {url}:\n{out}")
    latency = {q: float(v) * UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    return {"p50": latency["50"], "p99": latency["99"], "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


async def rewrite_alone(optimizer_url: str, n: int) -> list[float]:
    """Seconds of n ``Rewriter.arewrite`` calls, one at a time, to the gateway's optimizer: the rewrite's own latency."""
    from bpo_plugins import Rewriter

    rewriter = Rewriter.from_openai("script", base_url=optimizer_url, cache_size=0)
    seconds = []
    for i in range(n):
        start = time.perf_counter()
        await rewriter.arewrite(f"Tell me about topic {i} {time.perf_counter_ns()}")
        seconds.append(time.perf_counter() - start)
    return seconds


async def ttft(url: str, n: int) -> list[float]:
    """Seconds to the first content chunk of n streamed requests, one at a time."""
    async with httpx.AsyncClient(timeout=60) as client:
        return [(await timed(client, url, f"ttft request {i} {time.perf_counter_ns()}", True))[1] for i in range(n)]


def measure(targets: dict[str, str], optimizer_url: str, seconds: int, concurrencies: list[int], rounds: int,
            folder: Path) -> list[dict[str, Any]]:
    echo, optimizer = folder / "echo.lua", folder / "optimizer.lua"
    echo.write_text(WRK_SCRIPT.replace("MODEL", "echo").replace("SYSTEM", ""))
    # One optimizer call as the gateway's rewriter makes it: the scripted model, a system prompt and the prompt.
    optimizer.write_text(WRK_SCRIPT.replace("MODEL", "script").replace("SYSTEM", '{"role": "system", "content": "You rewrite prompts."}, '))
    for url in targets.values():  # warm every connection pool and code path once
        wrk(url, 4, 1, echo)
    rows = []
    for concurrency in concurrencies:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*targets, "optimizer call"]}
        first: dict[str, list[float]] = {name: [] for name in targets}
        rewrites: list[float] = []
        for _ in range(rounds):  # interleaved: each round times every target
            for name, url in targets.items():
                runs[name].append(wrk(url, concurrency, seconds, echo))
                if concurrency == 1:
                    first[name] += asyncio.run(ttft(url, 30))
            runs["optimizer call"].append(wrk(targets["direct"], concurrency, seconds, optimizer))
            if concurrency == 1:
                rewrites += asyncio.run(rewrite_alone(optimizer_url, 100))
        def med(name: str, key: str, runs: dict[str, list[dict[str, float]]] = runs) -> float:
            return statistics.median(run[key] for run in runs[name])

        for name in ("relay", "rewrite"):
            row = {
                "gateway": name, "concurrency": concurrency, "rounds": rounds, "seconds_per_run": seconds,
                "direct_p50_ms": round(med("direct", "p50"), 3), "direct_p99_ms": round(med("direct", "p99"), 3),
                "gateway_p50_ms": round(med(name, "p50"), 3), "gateway_p99_ms": round(med(name, "p99"), 3),
                "added_p50_ms": round(med(name, "p50") - med("direct", "p50"), 3),
                "added_p99_ms": round(med(name, "p99") - med("direct", "p99"), 3),
                "gateway_rps": round(med(name, "rps"), 1), "direct_rps": round(med("direct", "rps"), 1),
            }
            if concurrency == 1:
                row["ttft_added_p50_ms"] = round((pct(first[name], 0.5) - pct(first["direct"], 0.5)) * 1e3, 3)
            if name == "rewrite":
                row["optimizer_call_p50_ms"] = round(med("optimizer call", "p50"), 3)
                if rewrites:
                    row["rewriter_p50_ms"] = round(pct(rewrites, 0.5) * 1e3, 3)
                    row["added_beyond_rewrite_p50_ms"] = round(row["added_p50_ms"] - row["rewriter_p50_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    columns = ["gateway", "concurrency", "direct_p50_ms", "gateway_p50_ms", "added_p50_ms", "direct_p99_ms", "gateway_p99_ms",
               "added_p99_ms", "ttft_added_p50_ms", "direct_rps", "gateway_rps", "optimizer_call_p50_ms", "rewriter_p50_ms",
               "added_beyond_rewrite_p50_ms"]
    lines = [f"`{command}`", "", "| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 200])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: this benchmark drives load with wrk (a C load generator): apt-get install wrk")
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
        rows = measure(targets, upstream_url, args.seconds, args.concurrency, args.rounds, folder)
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
