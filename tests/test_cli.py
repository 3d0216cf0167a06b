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
        pytest.param(("optimize", "x", "--model", "/nonexistent/model"), "cannot load optimizer model",
                     marks=pytest.mark.slow),  # imports torch and transformers to try the load
        (("optimize", "x", "--batch-size", "0"), "Invalid value"),
    ],
)
def test_bad_input_exits_2_without_traceback(args, message):
    run = bpo(*args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert message in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


ROWS = "".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6))
TWO_ROWS = "".join(ROWS.splitlines(keepends=True)[:2]).encode()
#: (file name, bytes, the one line `bpo` prints after "error: PATH") for files a new user might hand it.
BAD_FILES = [
    ("rows.jsonl", ROWS.encode() + b'{"prompt": "seven" "eight"}\n', ":7: not valid JSON (Expecting ',' delimiter at column 20)"),
    ("rows.jsonl", b"prompt,context\nhello,world\n",
     ":1: not valid JSON (Expecting value at column 1); expected JSON Lines (one JSON object per line) or a JSON array of objects"),
    ("rows.jsonl", TWO_ROWS + b'{"prompt": "caf\xff"}\n', ":3: not UTF-8 (byte 0xff at column 16)"),
    ("rows.jsonl", b'{"prompt": "ok"}\n{"prompt": 5}\n', ":2: no string 'prompt' field (nor instruction, text, question)"),
    ("rows.jsonl", b'{"prompt": "ok"}\n["a list"]\n',
     ":2: not a JSON object (a list); expected JSON Lines (one JSON object per line) or a JSON array of objects"),
    ("rows.json", b'[\n  {"prompt": "ok"},\n  {"prompt": "ok"}\n  {"prompt": "no comma"}\n]\n',
     ":4: not valid JSON (expected ',' or ']' after an array item)"),
    ("rows.jsonl.gz", b"not gzip", ": not a readable gzip file (Not a gzipped file (b'no'))"),
]


def _one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES)
def test_bad_input_files_name_the_file_and_line(tmp_path: Path, name: str, content: bytes, expected: str):
    source = tmp_path / name
    source.write_bytes(content)
    run = bpo("optimize", "--file", str(source), "--out", str(tmp_path / "o.jsonl"))
    assert run.returncode == 2
    assert _one_error_line(run) == f"error: {source}{expected}"


def test_a_text_file_that_is_not_rows_names_itself_and_its_line(tmp_path: Path):
    run = bpo("optimize", "--file", "/etc/passwd", "--out", str(tmp_path / "o.jsonl"))
    assert run.returncode == 2
    assert _one_error_line(run).startswith("error: /etc/passwd:1: not valid JSON (Expecting value at column 1); expected JSON Lines")
    missing = bpo("optimize", "--file", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert missing.returncode == 2 and _one_error_line(missing) == f"error: {tmp_path / 'nope.jsonl'}: no such file"
    folder = bpo("optimize", "--file", str(tmp_path), "--out", str(tmp_path / "o.jsonl"))
    assert folder.returncode == 2 and _one_error_line(folder) == f"error: {tmp_path}: is a folder, not a file"


@pytest.mark.slow  # five CLI processes
def test_every_command_that_reads_a_file_names_its_line(tmp_path: Path):
    """bpo eval, bpo data build and bpo drpo --seeds read files as bpo optimize --file does."""
    bad_json = tmp_path / "set.jsonl"
    bad_json.write_bytes(TWO_ROWS + b"{oops}\n")
    bad_bytes = tmp_path / "seeds.txt"
    bad_bytes.write_bytes(b"How do I boil an egg?\nWhy is the sky blue?\nna\xefve question\n")
    runs = {
        "eval": (bpo("eval", str(bad_json), "--out", str(tmp_path / "eval")), f"{bad_json}:3: not valid JSON"),
        "data build": (bpo("data", "build", str(bad_json), "--out", str(tmp_path / "pairs.jsonl")), f"{bad_json}:3: not valid JSON"),
        "drpo --seeds txt": (bpo("drpo", "search", "--base", "gpt-4o-mini", "--judge", "gpt-4o-mini", "--dry-run", "--seeds", str(bad_bytes),
                                 "--out", str(tmp_path / "drpo")), f"{bad_bytes}:3: not UTF-8 (byte 0xef at column 3)"),
        "drpo --seeds jsonl": (bpo("drpo", "search", "--base", "gpt-4o-mini", "--judge", "gpt-4o-mini", "--dry-run", "--seeds",
                                   str(bad_json), "--out", str(tmp_path / "drpo")), f"{bad_json}:3: not valid JSON"),
    }
    (tmp_path / "ok.jsonl").write_text(ROWS)
    runs["eval --judge-prompts"] = (bpo("eval", str(tmp_path / "ok.jsonl"), "--judge-prompts", "/etc/passwd", "--target-model", "x",
                                        "--judge-model", "y", "--out", str(tmp_path / "eval")), "/etc/passwd:1: not valid JSON")
    for what, (run, expected) in runs.items():
        assert run.returncode == 2, (what, run.stderr[-2000:])
        assert _one_error_line(run).startswith(f"error: {expected}"), (what, run.stderr)


def test_an_adapter_for_an_api_optimizer_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 28: ``bpo eval --adapter`` with an API spec raised TypeError, reported as an internal error."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # no call is made: the spec is refused first
    (tmp_path / "ok.jsonl").write_text(ROWS)
    run = bpo("eval", str(tmp_path / "ok.jsonl"), "--model", "gpt-4o-mini", "--adapter", str(tmp_path), "--out", str(tmp_path / "eval"))
    assert run.returncode == 2, run.stderr
    assert _one_error_line(run) == "error: an adapter applies to a local model, and gpt-4o-mini is served over openai's API: drop the adapter"


BOOM = "import sys\nfrom bpo_plugins import cli\ncli.app.command('boom')(lambda: int('not a number'))\nsys.argv = ['bpo', 'boom']\ncli.main()\n"


def test_a_bug_is_an_internal_error_not_bad_input():
    """A ValueError the user's input did not cause exits 1 saying so; BPO_DEBUG=1 shows its traceback."""
    import os

    run = subprocess.run([sys.executable, "-c", BOOM], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert _one_error_line(run) == ("internal error: ValueError: invalid literal for int() with base 10: 'not a number' "
                                    "(set BPO_DEBUG=1 for the traceback)")
    debug = subprocess.run([sys.executable, "-c", BOOM], capture_output=True, text=True, timeout=120, env={**os.environ, "BPO_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and debug.stderr.strip().endswith(
        "ValueError: invalid literal for int() with base 10: 'not a number'")


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


@pytest.mark.slow  # builds the bundled model's runtime from an empty cache
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
