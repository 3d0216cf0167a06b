"""The ``bpo`` command as a user runs it: a real process, real models, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def bpo(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpo_plugins", *args], input=stdin, capture_output=True, text=True, timeout=600)


def test_optimize_bundled_model_prints_rewrite_or_visible_fallback(bundled_folder):
    run = bpo("optimize", "Tell me about Harry Potter", "--max-new-tokens", "48")
    assert run.returncode == 0, run.stderr
    printed = run.stdout.strip()
    assert printed
    if printed == "Tell me about Harry Potter":
        assert "[fallback:" in run.stderr  # the reason is shown, not hidden
    assert "Traceback" not in run.stderr


def test_optimize_json_and_stdin(tiny_bpo_dir):
    run = bpo("optimize", "-", "--model", str(tiny_bpo_dir), "--json", "--max-new-tokens", "4", stdin="What is love?\n")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["original"] == "What is love?\n" and result["mode"] == "greedy" and "fallback" in result


def test_batch_file_with_progress_and_resume(tiny_bpo_dir, tmp_path: Path):
    rows = [{"prompt": f"Question {i}?", "id": i} for i in range(5)] + [{"prompt": "Who owns it?", "context": "Ctx  kept.\n"}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    # An interrupted earlier run: two rows done, the third torn mid-line.
    first = bpo("optimize", "--file", str(source), "--out", str(out), "--model", str(tiny_bpo_dir), "--max-new-tokens", "4")
    assert first.returncode == 0, first.stderr
    done = out.read_text().splitlines()
    out.write_text("\n".join(done[:2]) + "\n" + done[2][:10])
    second = bpo("optimize", "--file", str(source), "--out", str(out), "--model", str(tiny_bpo_dir), "--max-new-tokens", "4", "--batch-size", "2")
    assert second.returncode == 0, second.stderr
    assert "rewriting" in second.stderr  # the progress bar
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] if "id" in w else "ctx" for w in written] == [0, 1, 2, 3, 4, "ctx"]
    assert all({"rewritten", "fallback"} <= w.keys() for w in written)
    assert written[-1]["context"] == "Ctx  kept.\n"
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["rows"] == 6 and stats["resumed_from"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "Usage"),
        (("optimize",), "give exactly one of"),
        (("optimize", "x", "--mode", "wild"), "unknown mode"),
        (("optimize", "--file", "missing.jsonl", "--out", "o.jsonl"), "no such file"),
        (("optimize", "x", "--backend", "carrier-pigeon"), "unknown backend"),
        (("optimize", "x", "--model", "/nonexistent/model"), "cannot load optimizer model"),
        (("optimize", "x", "--batch-size", "0"), "Invalid value"),
    ],
)
def test_bad_input_exits_2_without_traceback(args, message):
    run = bpo(*args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert message in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


def test_bad_rows_name_the_line(tmp_path: Path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    run = bpo("optimize", "--file", str(source), "--out", str(tmp_path / "o.jsonl"))
    assert run.returncode == 2 and "row 2" in run.stderr and "Traceback" not in run.stderr
    source.write_text('{"prompt": "ok"}\nnot json\n')
    run = bpo("optimize", "--file", str(source), "--out", str(tmp_path / "o.jsonl"))
    assert run.returncode == 2 and "bad.jsonl:2" in run.stderr


def test_bench_writes_figures(tiny_bpo_dir, tmp_path: Path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": f"Prompt {i}"}) for i in range(4)))
    out = tmp_path / "bench.json"
    run = bpo("bench", "--prompts", str(prompts), "--model", str(tiny_bpo_dir), "--out", str(out), "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    figures = json.loads(out.read_text())
    assert figures["n"] == 4 and figures["latency_p95_s"] >= figures["latency_p50_s"] > 0
    assert figures["peak_rss_mb"] > 0 and figures["tokens_per_s"] > 0
    assert "latency_p50_s" in run.stdout


def test_models_lists_the_registry():
    run = bpo("models")
    assert run.returncode == 0 and "bpo-small (default)" in run.stdout


def test_first_run_prints_only_progress_and_the_result(tmp_path: Path):
    """An empty cache: the bundled model is converted and its runtime built, quietly, then the rewrite."""
    import os

    env = {**os.environ, "BPO_PLUGINS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "bpo_plugins", "optimize", "Tell me about Harry Potter"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert not [line for line in lines if "INFO" in line or "legacy" in line or "Warning" in line], lines[:5]
    steps = {line.split(":")[1].strip().split(" (")[0] for line in lines if line.startswith("first run only:")}
    assert steps == {"converting the bundled model to safetensors", "building the int8 runtime of bpo-small"}, lines[:10]
    assert all(line.startswith(("first run only:", "[fallback")) for line in lines), lines[:10]
