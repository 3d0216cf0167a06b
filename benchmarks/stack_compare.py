"""Today's stack against the new one, side by side: GenAI int8 decode speed and the first-run build time of
bpo-small's default runtime, each stack in its own venv, the two taking turns.

A stack is a venv's python with its own cache dir (``$BPO_PLUGINS_CACHE``): the two stacks' exports differ,
so they must never share one. Each stack runs a worker process of this script; the driver sends both workers
the same prompt in turn (alternating which goes first), so a shared VM's drifting speed hits them alike,
as ``decode_speed.py`` does for runtimes within one process. The decode is ``decode_speed.py``'s: exactly 64
greedy tokens from a rendered bpo-small prompt, prefill timed apart. The build is the first run's: GGUF to
safetensors, then the GenAI int8 export with its parity check, into an empty cache dir, the stacks alternating.

    python benchmarks/stack_compare.py --stack before=/work/venvs/main/bin/python:$HOME/.cache/bpo-plugins \\
        --stack after=/work/venvs/stack/bin/python:/work/cache/stack --limit 12 --rounds 2 --builds 2 \\
        --out benchmarks/results/stack_compare
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENS = 64  # decode_speed.TOKENS
PROMPTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "bpo" / "vicuna_eval.jsonl"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("bpo-plugins", "torch", "transformers", "onnxruntime", "onnxruntime-genai", "optimum-onnx", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def worker(limit: int) -> None:
    """Load the default runtime from this stack's cache, then decode prompt i for each line i on stdin."""
    from decode_speed import genai_runner  # the same 64-token decode, timed the same way

    from bpo_plugins.backends.onnx import load_export
    from bpo_plugins.inputs import read_prompt_rows, row_prompt
    entry, default_export = _bundled_entry()
    assert entry is not None
    folder = default_export(entry)
    assert folder is not None, "no default runtime on this stack"
    backend = load_export(folder)
    texts = [backend.render(row_prompt(r), backend.default_template) for r in read_prompt_rows(PROMPTS)[:limit]]
    prompts = [backend.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    run = genai_runner(folder)
    print(json.dumps({"versions": _versions(), "export": folder.name}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(prompts[int(line)])), flush=True)


def _bundled_entry() -> tuple[object, object]:
    """bpo-small's registry entry and the default-export builder, in either layout: the stack compared against
    may run a release where both still lived in ``registry`` (``resolve``, ``default_export``)."""
    try:
        from bpo_plugins.backends.runtime import default_export
        from bpo_plugins.registry import lookup
    except ImportError:
        from bpo_plugins.registry import default_export  # type: ignore[no-redef]
        from bpo_plugins.registry import resolve as lookup  # type: ignore[no-redef]
    return lookup("bpo-small"), default_export


def build_once() -> None:
    """The first run's build, timed: GGUF conversion, then the default runtime's export (cache dir from the env)."""
    from bpo_plugins.registry import convert_gguf, find_smollm2_gguf

    start = time.perf_counter()
    convert_gguf(find_smollm2_gguf(), progress=False)
    converted = time.perf_counter()
    entry, default_export = _bundled_entry()
    assert entry is not None and default_export(entry) is not None
    print(json.dumps({"convert_s": converted - start, "total_s": time.perf_counter() - start}), flush=True)


def _first_json(stream: object) -> dict[str, object]:
    """The worker's ready line: the first stdout line that is a JSON object (a library may print before it)."""
    for line in stream:  # type: ignore[attr-defined]
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("a stack's worker exited before it was ready")


def _env(cache: str) -> dict[str, str]:
    return {**os.environ, "BPO_PLUGINS_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", action="append", default=[], help="NAME=PYTHON:CACHE_DIR (twice)")
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--builds", type=int, default=2, help="first-run builds per stack (0: none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stack_compare"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.limit)
    if args.build_once:
        return build_once()

    stacks = {}
    for spec in args.stack:
        name, rest = spec.split("=", 1)
        python, cache = rest.split(":", 1)
        stacks[name] = (python, os.path.expanduser(cache))
    me = str(Path(__file__).resolve())
    workers = {name: subprocess.Popen([python, me, "--worker", "--limit", str(args.limit)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=_env(cache), cwd=tempfile.gettempdir())
               for name, (python, cache) in stacks.items()}
    ready = {name: _first_json(w.stdout) for name, w in workers.items()}

    def decode(name: str, i: int) -> tuple[float, float]:
        w = workers[name]
        w.stdin.write(f"{i}\n")  # type: ignore[union-attr]
        w.stdin.flush()  # type: ignore[union-attr]
        first, rest = json.loads(w.stdout.readline())  # type: ignore[union-attr]
        return first, rest

    names = list(stacks)
    for name in names:
        decode(name, 0)  # warm-up
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for step in range(args.rounds * args.limit):
        for name in names if step % 2 == 0 else names[::-1]:
            first, rest = decode(name, step % args.limit)
            times[name][0].append(first)
            times[name][1].append(rest)
    for w in workers.values():
        w.stdin.close()  # type: ignore[union-attr]
        w.wait()

    builds: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(args.builds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            python, _ = stacks[name]
            with tempfile.TemporaryDirectory() as empty:
                done = subprocess.run([python, me, "--build-once"], env=_env(empty), cwd=tempfile.gettempdir(),
                                      capture_output=True, text=True, check=True)
            builds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))

    rows = []
    for name in names:
        prefill, rest = times[name]
        row = {"stack": name, **ready[name]["versions"], "export": ready[name]["export"],
               "decode_tok_s": round((TOKENS - 1) * len(rest) / sum(rest), 1),
               "prefill_ms_p50": round(1000 * statistics.median(prefill), 1)}
        if builds[name]:
            row["first_run_build_s"] = [round(b["total_s"], 1) for b in builds[name]]
            row["gguf_convert_s"] = [round(b["convert_s"], 1) for b in builds[name]]
        rows.append(row)
    base = rows[0]["decode_tok_s"]
    for row in rows:
        row["decode_x_first"] = round(row["decode_tok_s"] / base, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"limit": args.limit, "rounds": args.rounds, "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
