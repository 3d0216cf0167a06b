"""The gateway's own cost, side by side in one interleaved run against the same upstream.

    python benchmarks/gateway.py --seconds 3 --rounds 3 --concurrency 1 64   # needs wrk: apt-get install wrk

Processes (all on this machine, sharing its cores with wrk):
- the upstream: ``tests/support/anthropic_server.py --no-record`` (plain ASGI; ``/v1/chat/completions``
  and ``/v1/messages`` answer the same reply at the same cost);
- ``bpo proxy --no-rewrite`` (one worker) and ``bpo proxy --no-rewrite --workers 2``;
- a rewriting ``bpo proxy`` whose optimizer is the scripted OpenAI-compatible test server
  (``tests/support/openai_server.py``, model ``script``);
- LiteLLM's proxy (``litellm --config``) with one ``openai/echo`` model on the same upstream, no guardrail
  (skipped with ``--no-litellm`` or when the ``litellm`` command is missing).

Rows (each against the direct upstream on the same route): ``relay`` (chat), ``relay messages``
(Anthropic's route, one worker), ``relay 2 workers`` (chat), ``litellm`` (chat), ``rewrite`` (chat, a new prompt each request so
no cache answers). Load comes from wrk (C, one thread). For each
concurrency, every target is timed once per round, interleaved, and each figure is the median over
rounds; the ratios (``2 workers / 1``, ``messages / chat``) compare medians of the same run. The
gateway's own time per request (``X-BPO-Overhead-Ms``) is sampled one request at a time.
Figures go to ``benchmarks/results/gateway.{json,md}``.
"""

from __future__ import annotations

import argparse
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
ANTHROPIC = ROOT / "tests" / "support" / "anthropic_server.py"
OPENAI = ROOT / "tests" / "support" / "openai_server.py"


def start(command: list[str], pattern: str, log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    sink = log.open("w")
    process = subprocess.Popen(command, stdout=sink, stderr=sink, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 180
    while not (match := re.search(pattern, log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:3]} did not start: {log.read_text()[-1000:]}")
        time.sleep(0.05)
    return process, match.group(1)


def start_litellm(upstream_url: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    config = folder / "litellm.yaml"
    config.write_text("model_list:\n  - model_name: echo\n    litellm_params:\n      model: openai/echo\n"
                      f"      api_base: {upstream_url}\n      api_key: sk-bench\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = (folder / "litellm.log").open("w")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": BENCH_KEY}
    process = subprocess.Popen([str(Path(sys.executable).with_name("litellm")), "--config", str(config), "--host", "127.0.0.1",
                                "--port", str(port)], stdout=sink, stderr=sink, env=env, cwd=folder)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise RuntimeError("litellm did not start: " + (folder / "litellm.log").read_text()[-1000:])


#: wrk sends a different prompt each request, so no cache (the gateway's, the rewriter's) answers for it.
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local text = "wrk request " .. counter .. " " .. math.random(1000000000)
  local body = BODY
  return wrk.format("POST", "PATH", {["Content-Type"] = "application/json", ["anthropic-version"] = "2023-06-01",
                                     ["Authorization"] = "Bearer KEY"}, body)
end
"""
CHAT = """'{"model": "MODEL", "messages": [SYSTEM{"role": "user", "content": "' .. text .. '"}]}'"""
MESSAGES = """'{"model": "claude-bench", "max_tokens": 64, "messages": [{"role": "user", "content": "' .. text .. '"}]}'"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
#: LiteLLM's proxy refuses to start without a master key; every target gets it (the others ignore it).
BENCH_KEY = "sk-bench-" + "0" * 32


def lua(folder: Path, name: str, path: str, body: str) -> Path:
    script = folder / f"{name}.lua"
    script.write_text(WRK_SCRIPT.replace("BODY", body).replace("PATH", path).replace("KEY", BENCH_KEY))
    return script


def wrk(url: str, concurrency: int, seconds: int, script: Path) -> dict[str, float]:
    """p50 / p99 latency (ms) and requests/s of one wrk run; any non-2xx answer fails the benchmark."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "--latency", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests against {url}:\n{out}")
    latency = {q: float(v) * UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    return {"p50": latency["50"], "p99": latency["99"], "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


def own_overhead(url: str, path: str, body: dict[str, Any], n: int = 200) -> float | None:
    """Median X-BPO-Overhead-Ms over n requests, one at a time."""
    values = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            response = client.post(url + path, json={**body, "messages": [{"role": "user", "content": f"overhead {i} {time.time_ns()}"}]})
            if "x-bpo-overhead-ms" in response.headers:
                values.append(float(response.headers["x-bpo-overhead-ms"]))
    return round(statistics.median(values), 3) if values else None


def measure(targets: dict[str, tuple[str, Path, str]], seconds: int, concurrencies: list[int], rounds: int) -> list[dict[str, Any]]:
    """targets: name -> (server URL, wrk script, the name of the direct target it is compared with)."""
    for url, script, _ in targets.values():  # warm every connection pool and code path once
        wrk(url, 4, 1, script)
    rows = []
    for concurrency in concurrencies:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(rounds):  # interleaved: each round times every target
            for name, (url, script, _) in targets.items():
                runs[name].append(wrk(url, concurrency, seconds, script))

        def med(name: str, key: str, runs: dict[str, list[dict[str, float]]] = runs) -> float:
            return statistics.median(run[key] for run in runs[name])

        for name, (_, _, direct) in targets.items():
            if name.startswith("direct"):
                continue
            row = {
                "target": name, "concurrency": concurrency, "rounds": rounds, "seconds_per_run": seconds,
                "direct_p50_ms": round(med(direct, "p50"), 3), "p50_ms": round(med(name, "p50"), 3),
                "added_p50_ms": round(med(name, "p50") - med(direct, "p50"), 3),
                "direct_p99_ms": round(med(direct, "p99"), 3), "p99_ms": round(med(name, "p99"), 3),
                "direct_rps": round(med(direct, "rps"), 1), "rps": round(med(name, "rps"), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "relay" in runs and "relay 2 workers" in runs:
            rows.append({"target": "ratio: 2 workers / 1 worker rps", "concurrency": concurrency,
                         "rps": round(med("relay 2 workers", "rps") / med("relay", "rps"), 3)})
        if "relay" in runs and "relay messages" in runs:
            rows.append({"target": "ratio: messages / chat rps", "concurrency": concurrency,
                         "rps": round(med("relay messages", "rps") / med("relay", "rps"), 3)})
    return rows


def markdown(rows: list[dict[str, Any]], command: str, overhead: dict[str, float | None]) -> str:
    columns = ["target", "concurrency", "direct_p50_ms", "p50_ms", "added_p50_ms", "direct_p99_ms", "p99_ms", "direct_rps", "rps"]
    lines = [f"`{command}`", "", "| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in columns) + " |" for r in rows]
    lines += ["", "X-BPO-Overhead-Ms, median of 200 sequential requests: "
              + ", ".join(f"{name} {value} ms" for name, value in overhead.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="length of one wrk run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: this benchmark drives load with wrk (a C load generator): apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix="bpo-gateway-bench-"))
    script = folder / "script.json"
    script.write_text("{}")  # the script model rewrites a prompt into the template's text: always a change
    processes = []
    try:
        upstream, port = start([sys.executable, str(ANTHROPIC), "--no-record"], r"PORT (\d+)", folder / "upstream.log")
        optimizer, optimizer_port = start([sys.executable, str(OPENAI), "--script", str(script)], r"PORT (\d+)", folder / "optimizer.log")
        processes += [upstream, optimizer]
        upstream_url, optimizer_url = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{optimizer_port}/v1"
        cli = [sys.executable, "-m", "bpo_plugins.cli", "proxy", "--upstream", upstream_url, "--anthropic-upstream",
               upstream_url.removesuffix("/v1"), "--port", "0"]
        pattern = r"at (http://\S+)/v1"
        relay, relay_url = start([*cli, "--no-rewrite"], pattern, folder / "relay.log")
        workers, workers_url = start([*cli, "--no-rewrite", "--workers", "2"], pattern, folder / "workers.log")
        rewriting, rewrite_url = start([*cli, "--optimizer", "script", "--optimizer-base-url", optimizer_url, "--rewrite-timeout", "30"],
                                       pattern, folder / "rewrite.log")
        processes += [relay, workers, rewriting]
        chat = lua(folder, "chat", "/v1/chat/completions", CHAT.replace("MODEL", "echo").replace("SYSTEM", ""))
        messages = lua(folder, "messages", "/v1/messages", MESSAGES)
        direct = upstream_url.removesuffix("/v1")
        targets = {"direct": (direct, chat, ""), "direct messages": (direct, messages, ""),
                   "relay": (relay_url, chat, "direct"), "relay messages": (relay_url, messages, "direct messages"),
                   "relay 2 workers": (workers_url, chat, "direct"),
                   "rewrite": (rewrite_url, chat, "direct")}
        if not args.no_litellm and Path(sys.executable).with_name("litellm").exists():
            litellm, litellm_url = start_litellm(upstream_url, folder)
            processes.append(litellm)
            targets["litellm"] = (litellm_url.removesuffix("/v1"), chat, "direct")
        time.sleep(2)  # the workers and the rewriter's optimizer finish starting
        overhead = {"relay chat": own_overhead(relay_url, "/v1/chat/completions", {"model": "echo"}),
                    "relay messages": own_overhead(relay_url, "/v1/messages", {"model": "claude-bench", "max_tokens": 64})}
        rows = measure(targets, args.seconds, args.concurrency, args.rounds)
    finally:
        for process in processes:
            process.terminate()
    command = "python benchmarks/gateway.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "cpus": os.cpu_count(), "overhead_ms": overhead,
                                                         "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, command, overhead))
    print(markdown(rows, command, overhead))


if __name__ == "__main__":
    main()
