"""DRPO search: does a level cost one call's latency, not fifteen? Does a resumed run pay twice?

    python benchmarks/drpo_search.py --latency 0.5 --rounds 3

Every role (base model, metrics, judge, optimizer) is the test server's scripted model with a fixed
latency per call, so wall time measures the search's scheduling and nothing else. A level with a
beam of 2 and 3 actions makes 2 optimizer calls, 6 answers, 6 judgements and 1 aspect call (15 calls);
its critical path is three calls (propose, answer, judge; the aspect call overlaps the first two).
We report each level's wall time in units of one call's latency.

Resume: a search is killed mid-level (SIGKILL, once its first level is checkpointed) and started again;
the server's request count for killed + resumed is compared with an uninterrupted run's, and a finished
search run again (``--fresh``) must be answered wholly from the cache. Figures go to
``benchmarks/results/drpo_search.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
SEEDS = [f"Explain topic number {i} to a curious student." for i in range(40)]


def script(latency: float, depth: int) -> dict[str, Any]:
    """Fixed-latency replies. The optimizer's three proposals extend the prompt it was shown, so every
    child of every level is a new prompt (keyed on the prompt just before its closing tag)."""
    wait = f"__sleep__:{latency}:"
    replies: dict[str, Any] = {}
    level = ["You are a helpful assistant."]
    for _ in range(depth + 1):
        children = []
        for prompt in level:
            proposals = [f"{prompt} Rule {j}." for j in range(3)]
            replies[f"{prompt}\n</current_system_prompt>"] = [wait + json.dumps({"new_system_prompt": p}) for p in proposals]
            children += proposals
        level = children
    return {
        **replies,
        "Decide which aspects matter most": wait + '{"harmful": false, "aspects": ["Helpfulness", "Clarity", "Depth"]}',
        "Rate an AI assistant's answer": wait + '{"Helpfulness": {"score": 3}, "Clarity": {"score": 4}, "Depth": {"score": 3}}',
        "# Query:": wait + "<START>\nAn answer.\n<END>",
    }


def start_server(script_path: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, str(SERVER), "--script", str(script_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    return process, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def requests_made(url: str) -> int:
    return len(httpx.get(url + "/received", timeout=30).json()["received"])


def search_command(url: str, out: Path, depth: int) -> list[str]:
    spec = f"script@{url}"
    return [sys.executable, "-m", "bpo_plugins.cli", "drpo", "search", "--base", spec, "--judge", spec, "--seeds", str(out.parent / "seeds.txt"),
            "--depth", str(depth), "--max-extensions", "0", "--holdout", "2", "--out", str(out)]


def cached_calls(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM rewrites").fetchone()[0])


def run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def level_walls(url: str, folder: Path, latency: float, depth: int, rounds: int) -> list[float]:
    """Wall seconds of each level past the root, from the checkpoint's modification times."""
    from bpo_plugins.backends import load_backend
    from bpo_plugins.drpo.search import Search, SearchConfig, Seed
    from bpo_plugins.drpo.session import default_roles

    walls: list[float] = []
    for round_ in range(rounds):
        scripted = load_backend("script", base_url=url, max_retries=0)
        roles = default_roles(scripted, scripted, scripted)
        stamps: list[float] = []
        search = Search(roles, folder / f"walls{round_}", config=SearchConfig(depth=depth, max_extensions=0, holdout=0, seed=round_),
                        seeds=[Seed(q, "bench") for q in SEEDS], examples=[], known_aspects={}, progress=False)
        start = time.perf_counter()
        search.run(on_level=lambda state, stamps=stamps: stamps.append(time.perf_counter()))
        edges = [start, *stamps]
        # The first interval also holds the root's evaluation (answer + aspects, then judge: 2 calls).
        walls += [b - a for a, b in zip(edges[1:], edges[2:])]
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.5, help="Seconds the server waits before each answer.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "script.json").write_text(json.dumps(script(args.latency, args.depth)))
        (folder / "seeds.txt").write_text("\n".join(SEEDS) + "\n")
        process, url = start_server(folder / "script.json")
        try:
            walls = level_walls(url, folder, args.latency, args.depth, args.rounds)

            before = requests_made(url)
            run(search_command(url, folder / "straight", args.depth))
            straight = requests_made(url) - before

            before = requests_made(url)
            killed = subprocess.Popen(search_command(url, folder / "killed", args.depth), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            checkpoint = folder / "killed" / "checkpoint.json"
            while not (checkpoint.is_file() and json.loads(checkpoint.read_text())["level"] >= 1):
                time.sleep(0.02)
            time.sleep(1.5 * args.latency)  # into level 2: its proposals are sent, not yet checkpointed
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            paid_before_kill = requests_made(url) - before
            completed_before_kill = cached_calls(folder / "killed" / "calls.sqlite")
            run(search_command(url, folder / "killed", args.depth))
            paid_killed_and_resumed = requests_made(url) - before
            resumed = json.loads((folder / "killed" / "report.json").read_text())

            before = requests_made(url)
            run([*search_command(url, folder / "straight", args.depth), "--fresh"])
            rerun_sent = requests_made(url) - before
            rerun = json.loads((folder / "straight" / "report.json").read_text())["cache"]
        finally:
            process.terminate()
            process.wait()

    figures = {
        "latency_s": args.latency, "rounds": args.rounds, "levels_timed": len(walls),
        "calls_per_level": 15, "critical_path_calls": 3,
        "level_wall_median_s": round(statistics.median(walls), 3), "level_wall_max_s": round(max(walls), 3),
        "level_wall_in_call_latencies": round(statistics.median(walls) / args.latency, 2),
        "sequential_level_s": 15 * args.latency,
        "resume": {
            "uninterrupted_requests": straight, "requests_before_kill": paid_before_kill,
            "completed_before_kill": completed_before_kill, "in_flight_at_kill": paid_before_kill - completed_before_kill,
            "killed_plus_resumed_requests": paid_killed_and_resumed, "repaid_requests": paid_killed_and_resumed - straight,
            "resumed_from_level": resumed["resumed_from_level"], "resumed_run_cached_calls": resumed["cache"]["cached_calls"],
        },
        "rerun_finished_search": {"requests_sent": rerun_sent, "cached_calls": rerun["cached_calls"], "live_calls": rerun["live_calls"],
                                  "hit_rate": round(rerun["cached_calls"] / max(rerun["cached_calls"] + rerun["live_calls"], 1), 4)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drpo_search.json").write_text(json.dumps(figures, indent=2) + "\n")
    r, again = figures["resume"], figures["rerun_finished_search"]
    markdown = "\n".join([
        "# DRPO search: level wall time and resume", "",
        f"Scripted roles, {args.latency} s per call; beam 2 x 3 actions = 15 calls per level, 3 on the critical path.", "",
        "| figure | value |", "|---|---|",
        f"| level wall, median of {len(walls)} levels | {figures['level_wall_median_s']} s = {figures['level_wall_in_call_latencies']} call latencies |",
        f"| level wall, worst | {figures['level_wall_max_s']} s |",
        f"| the same 15 calls one after another | {figures['sequential_level_s']} s |",
        f"| requests, uninterrupted search | {r['uninterrupted_requests']} |",
        f"| requests, killed in level 2 + resumed | {r['requests_before_kill']} + {r['killed_plus_resumed_requests'] - r['requests_before_kill']} = {r['killed_plus_resumed_requests']} |",
        f"| re-paid after the resume | {r['repaid_requests']}: the {r['in_flight_at_kill']} calls in flight at the kill, no finished one |",
        f"| calls answered by the cache over the resumed search (counts restored from the checkpoint) | {r['resumed_run_cached_calls']} |",
        f"| finished search run again: cache hit rate | {100 * again['hit_rate']:.0f}% ({again['requests_sent']} requests sent) |",
        "",
    ])
    (args.out / "drpo_search.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
