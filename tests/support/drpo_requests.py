"""The requests each DRPO role makes, before and after a change: a markdown table for a resolve note.

Runs ``bpo drpo search`` (one edit level, one held-out seed) and ``bpo drpo icl`` (2 rounds) of two versions
of the package against one scripted, recording server process (``openai_server.py``), every role a
model of its own name, and prints per job and role: requests, temperature, top_p, max_tokens, n and
what the prompt carries. "Before" is the package at a git revision, extracted with ``git archive``
(nothing in the checkout changes); "after" is the working tree.

    python tests/support/drpo_requests.py --before 7ae001d
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).parent / "openai_server.py"
REASON = "REASON-MARK the user wants steps"
RATIONALE = "RATIONALE-MARK"
ASPECTS = ["Helpfulness", "Clarity", "Depth"]


def _scores(*scores: int) -> str:
    return json.dumps({a: {"rationale": f"{RATIONALE} on {a}", "score": s} for a, s in zip(ASPECTS, scores)})


#: Replies both versions read. The example loop's first rewrite (ANS-1) scores worse than the base
#: answer (ANS-0): the second round shows whether a version rewrites the latest answer or the best.
SCRIPT: dict[str, Any] = {
    "Decide which aspects matter most": json.dumps({"aspects_selection": {"reasoning": REASON, "selected_aspects": ASPECTS}}),
    "<answer>\nANS-1": _scores(2, 2, 2),
    "<original_answer>\nANS-0": json.dumps({"analysis": "a", "thought": "t", "new_response": "<START>\nANS-1 rewritten answer.\n<END>"}),
    "<original_answer>\nANS-1": json.dumps({"analysis": "a", "thought": "t", "new_response": "<START>\nANS-2 rewritten again.\n<END>"}),
    "Rewrite the answer so that it would earn": "ANS-1 rewritten answer.",
    "Rate an AI assistant's answer": _scores(3, 4, 3),
    "You improve the system prompt": [json.dumps({"new_system_prompt": f"Prompt variant {i}."}) for i in range(3)],
    "# Query:\n": "<START>\nANS-0 base answer.\n<END>",
}
ROLES = {"script-base": "base", "script-metrics": "metrics", "script-judge": "judge", "script-optimizer": "optimizer"}


def _package(rev: str, folder: Path) -> Path:
    """The package at ``rev`` laid out as installed (training/ and export/ inside bpo_plugins/)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "bpo_plugins", "training", "export"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    for sub in ("training", "export"):
        if (folder / sub).is_dir():
            shutil.move(str(folder / sub), str(folder / "bpo_plugins" / sub))
    return folder


def _received(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url + "/v1/received") as response:
        return json.load(response)["received"]


def run_version(pythonpath: Path | None, work: Path, depth: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every request of a search and an example run, by (job, role)."""
    work.mkdir(parents=True)
    script = work / "script.json"
    script.write_text(json.dumps(SCRIPT))
    (work / "seeds.txt").write_text("How do I repot a plant?\nHow do I sharpen a knife?\nHow do I clean a cast-iron pan?\n")
    (work / "queries.txt").write_text("How do I fold a fitted sheet?\n")
    (work / "examples.json").write_text(json.dumps({"examples": [{"query": "How do I make tea?", "answer": "Boil water, then steep."}]}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    server = subprocess.Popen([sys.executable, str(SERVER), "--script", str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=work)
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}"
        roles = [arg for model in ROLES for arg in (f"--{ROLES[model]}", f"{model}@{url}/v1")]
        jobs = {
            "search": ["search", *roles, "--seeds", "seeds.txt", "--examples", "examples.json", "--depth", str(depth),
                       "--max-extensions", "0", "--holdout", "1", "--out", "search"],
            "icl": ["icl", *roles, "--queries", "queries.txt", "--rounds", "2", "--out", "icl/bank.json"],
        }
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for job, args in jobs.items():
            mark = len(_received(url))
            done = subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "drpo", *args], capture_output=True, text=True,
                                  env=env, cwd=work, timeout=600)
            if done.returncode:
                raise SystemExit(f"{job} failed ({pythonpath or 'working tree'}):\n{done.stderr[-2000:]}")
            for request in _received(url)[mark:]:
                role = ROLES[request["body"]["model"]]
                out.setdefault((job, "rewriter" if job == "icl" and role == "optimizer" else role), []).append(request["body"])
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def _values(bodies: list[dict[str, Any]], key: str, default: str) -> str:
    return ", ".join(sorted({str(b.get(key, default)) for b in bodies}))


def carries(role: str, bodies: list[dict[str, Any]]) -> str:
    """What a role's prompts carry, read off the requests."""
    texts = [b["messages"][-1]["content"] for b in bodies]
    text = texts[0]
    instructions = re.sub(r"<(\w+)>\n.*?\n</\1>", "", text, flags=re.S)  # without the tagged inputs
    notes = []
    if role == "base":
        system = next((m["content"] for m in bodies[0]["messages"] if m["role"] == "system"), "")
        notes += [f"system: prompt + {system.count('#Query:')} example(s)", "user: # Query ... <START>", f"stop {bodies[0].get('stop')}"]
    elif role == "metrics":
        asked = re.search(r"(?:between|at least) (\d) and (?:at most )?(\d)", text)
        notes += [f"picks {asked.group(1)}-{asked.group(2)} aspects" if asked else "picks ? aspects",
                  "DRPO's reply shape (aspects_selection.reasoning)" if "aspects_selection" in text else "own reply shape"]
    elif role == "judge":
        anchored = all(re.search(rf"- {a}:.*\b5\b.*\b1\b", text) for a in ASPECTS)
        notes += [f"aspect reasoning in {sum(REASON in t for t in texts)}/{len(texts)}",
                  "1/5 anchors" if anchored else "no anchors",
                  "1-5 agree scale" if "strongly agree" in text else "1 (very poor)-5 (excellent)"]
        if "Be strict" in text:
            notes.append("'Be strict' wording")
        if "ruthless critic" in text:
            notes.append("ruthless critic")
        if "refusal" in text.lower():
            notes.append("refusal instruction")
    elif role == "optimizer":
        rules = len(re.findall(r"^(?:\d+\.|-) ", instructions, re.M))
        notes += [f"{rules} rules", "rating with rationales" if RATIONALE in text else "rating without rationales",
                  "prompt versions incl. current" if "[Current version]" in text else "earlier versions only"]
    elif role == "rewriter":
        guidelines = len(re.findall(r"^\d+\. ", instructions.split("# Query:")[0], re.M))
        examples = text.count("# Answer:\n<START>")
        notes += [f"{guidelines} guidelines", f"{examples} annotated examples",
                  "rewrites the latest answer" if any("ANS-1" in t for t in texts) else "rewrites the best answer",
                  "JSON reply {analysis, thought, new_response}" if '"new_response"' in text else "plain-text reply",
                  "critic feedback" if "ruthless critic" in text else "judge rating"]
    return "; ".join(notes)


def table(before: dict[tuple[str, str], list[dict[str, Any]]], after: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    def pair(a: str, b: str) -> str:
        return a if a == b else f"{a} → {b}"

    lines = ["| job | role | requests | temperature | top_p | max_tokens | n | before: the prompt carries | after: the prompt carries |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({*before, *after}):
        a, b = before.get(key, []), after.get(key, [])
        cells = [pair(str(len(a)), str(len(b)))]
        for field, default in (("temperature", "-"), ("top_p", "1 (unset)"), ("max_tokens", "-"), ("n", "1 (unset)")):
            cells.append(pair(_values(a, field, default) if a else "-", _values(b, field, default) if b else "-"))
        lines.append(f"| {key[0]} | {key[1]} | {' | '.join(cells)} | {carries(key[1], a) if a else '-'} | {carries(key[1], b) if b else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' package")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = _package(args.before, Path(tmp) / "before-src")
        # One edit level in both: --depth counted edits before 23ae0ce, and counts states (root included) since, as DRPO's.
        before = run_version(old, Path(tmp) / "before", depth=1)
        after = run_version(ROOT, Path(tmp) / "after", depth=2)
    print(f"before = {args.before}, after = the working tree\n")
    print(table(before, after))


if __name__ == "__main__":
    main()
