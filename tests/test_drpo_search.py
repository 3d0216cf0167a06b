"""DRPO's search and example optimization, end to end against real server processes.

The base model is the bundled SmolLM2 behind an OpenAI-compatible server; the metrics, judge and
optimizer LLMs (which cannot exist here) are scripted replies from a second server process, so the
JSON they return is fixed and the runs are deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpo_plugins.backends import load_backend
from bpo_plugins.drpo import Alignment, load_alignment
from bpo_plugins.drpo.calls import Caps
from bpo_plugins.drpo.icl import read_examples
from bpo_plugins.drpo.reward import AspectChoice, corrected_for_refusal, find_json, read_aspect_choice, read_judgement
from bpo_plugins.drpo.search import Search, SearchConfig, Seed
from bpo_plugins.drpo.session import Session, default_roles
from tests.conftest import Server
from tests.support.processes import scripted_server

METRICS = "Decide which aspects matter most"
JUDGE = "Rate an AI assistant's answer"
OPTIMIZE = "You improve the system prompt"
REWRITE = "write an answer that satisfies a ruthless critic"

SCRIPT = {
    # Rewritten answers (the ICL optimizer's) are rated perfect; the base model's own are not.
    "IMPROVED ANSWER": '{"Helpfulness": {"rationale": "complete", "score": 5}, "Clarity": {"rationale": "clear", "score": 5}}',
    METRICS: 'Here is my choice:\n```json\n{"analysis": "a how-to", "harmful": false, "reasoning": "basics", "aspects": ["helpfulness", "Clarity"]}\n```',
    JUDGE: '{"Helpfulness": {"rationale": "thin", "score": "3.5"}, "Clarity": {"rationale": "fine", "score": 4}}',
    OPTIMIZE: [
        '{"analysis": "too short", "thought": "ask for detail", "new_system_prompt": "You are a helpful assistant. Answer in full sentences."}',
        'Sure! {"new_system_prompt": "You are a careful assistant. Give one example."}',
        "I would rather not.",
    ],
    REWRITE: '{"analysis": "thin", "thought": "expand", "new_response": "<START>\\nIMPROVED ANSWER: a complete, clear answer.\\n<END>"}',
    "[User Question]": "Assistant A is better. [[A]]",  # a pairwise judge with pure position bias
}
HOSTILE = {
    METRICS: '{"aspects": ["Wit", "Charm", "Panache"]}',  # invented aspects only: the default pair is used
    JUDGE: 'My verdict, in prose: ```{"helpfulness": {"score": "4.5/5"}, "Clarity": "Score: 2", "Invented": 1}``` hope it helps',
    OPTIMIZE: ["", '{"new_system_prompt": "' + "x" * 7000 + '"}', "{not json at all"],
}
FLAKY = {  # every role fails twice with a retryable status before it answers
    METRICS: "__flaky__:2:429:" + SCRIPT[METRICS],
    JUDGE: "__flaky__:2:503:" + SCRIPT[JUDGE],
    OPTIMIZE: SCRIPT[OPTIMIZE],
}
SEEDS = [
    "How do I boil an egg?", "Name three primary colours.", "Why is the sky blue?", "Give me a tip for sleeping better.",
    "What is a haiku?", "How do plants drink water?", "Suggest a name for a cat.", "What does a thermometer measure?",
]
EXAMPLES = {"examples": [
    {"query": "How do I make tea?", "answer": "Boil water, pour it over the tea, wait three minutes."},
    {"query": "What is rain?", "answer": "Water that falls from clouds."},
]}


def _script_server(tmp_path_factory: pytest.TempPathFactory, name: str, script: dict) -> Iterator[Server]:
    yield from scripted_server(tmp_path_factory.mktemp(name), script)


@pytest.fixture(scope="module")
def llms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _script_server(tmp_path_factory, "drpo-llms", SCRIPT)


@pytest.fixture(scope="module")
def hostile_llms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _script_server(tmp_path_factory, "drpo-hostile", HOSTILE)


@pytest.fixture(scope="module")
def flaky_llms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _script_server(tmp_path_factory, "drpo-flaky", FLAKY)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("drpo-files")
    (folder / "seeds.txt").write_text("\n".join(SEEDS) + "\n")
    (folder / "examples.json").write_text(json.dumps(EXAMPLES))
    return {"seeds": folder / "seeds.txt", "examples": folder / "examples.json"}


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "drpo", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _search_args(model_server: Server, llms: Server, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["search", "--base", f"test-model@{model_server.base_url}", "--judge", f"script-judge@{llms.base_url}",
            "--optimizer", f"script-optimizer@{llms.base_url}", "--seeds", str(files["seeds"]), "--examples", str(files["examples"]),
            "--depth", "2", "--max-extensions", "0", "--holdout", "2", "--answer-tokens", "12", "--out", str(out), *extra]


def _requests(*servers: Server) -> int:
    return sum(len(s.received()) for s in servers)


def _comparable(report: dict) -> list[dict]:
    return [{k: v for k, v in level.items() if k not in ("live_calls", "cost_usd")} for level in report["levels"]]


def test_dry_run_projects_calls_per_role_and_calls_nothing(model_server: Server, llms: Server, files, tmp_path: Path):
    before = _requests(model_server, llms)
    done = _cli(*_search_args(model_server, llms, files, tmp_path / "run", "--price", "judge=2.5/10", "--max-calls", "optimizer=3",
                              "--dry-run"))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    # Depth 2 is the root and 1 level (DRPO's path of 2 states): 1 root + 1 level x beam 2 x 3 actions
    # + (3 candidates + the initial prompt) x 2 held-out = 15 evaluations; 2 optimizer calls at most.
    assert rows["base"][1] == "15" and rows["judge"][1] == "15" and rows["optimizer"][1] == "2"
    assert rows["base"][4] == "unpriced" and float(rows["judge"][4]) > 0 and "(cap calls 3)" in done.stdout
    assert _requests(model_server, llms) == before
    assert not (tmp_path / "run").exists()  # a dry run writes nothing either


def test_search_end_to_end_writes_artifact_and_report(model_server: Server, llms: Server, files, tmp_path: Path):
    out = tmp_path / "run"
    done = _cli(*_search_args(model_server, llms, files, out))
    assert done.returncode == 0, done.stderr
    aligned = load_alignment(out / "alignment.json")
    report = json.loads((out / "report.json").read_text())
    assert [level["level"] for level in report["levels"]] == [0, 1]  # depth 2: a path of 2 states, as DRPO's
    # The scripted optimizer's third proposal has no JSON: two children from the root, counted skips.
    assert report["levels"][1]["children"] == 2 and report["skips"]["proposal_unparsed"] >= 1
    final = report["final_check"]
    assert {c["prompt"] for c in final["candidates"]} >= {"You are a helpful assistant."}
    assert aligned.system_prompt == final["winner"] and "beat" in done.stdout
    assert aligned.provenance["base_model"].startswith("openai:test-model") and aligned.provenance["calls"] > 0
    assert [e.query for e in aligned.examples] == ["How do I make tea?", "What is rain?"] and aligned.k == 3
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and "## Levels" in (out / "report.md").read_text()
    # Run again from the finished checkpoint: every call is a cache hit, nothing new is sent.
    before = _requests(model_server, llms)
    again = _cli(*_search_args(model_server, llms, files, out, "--fresh"))
    assert again.returncode == 0 and "0 live" in again.stdout, again.stdout
    assert _requests(model_server, llms) == before


def _sent_since(servers: tuple[Server, ...], marks: list[int]) -> set[str]:
    """The distinct requests (path and body) each server received after ``marks``: a transport retry
    of the same call (a keep-alive connection closed under it) is one call, not two."""
    return {json.dumps({"path": r["path"], "body": r["body"]}, sort_keys=True)
            for server, mark in zip(servers, marks) for r in server.received()[mark:]}


def test_killed_search_resumes_to_the_same_artifact_without_paying_twice(model_server: Server, llms: Server, files, tmp_path: Path):
    args = ["--depth", "3"]
    servers = (model_server, llms)
    marks = [len(s.received()) for s in servers]
    straight = _cli(*_search_args(model_server, llms, files, tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr
    paid_straight = _sent_since(servers, marks)

    out = tmp_path / "killed"
    marks = [len(s.received()) for s in servers]
    process = subprocess.Popen([sys.executable, "-m", "bpo_plugins.cli", "drpo", *_search_args(model_server, llms, files, out), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not (checkpoint.is_file() and json.loads(checkpoint.read_text())["level"] >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "the search ended before its first level"
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)  # mid-level 2: its first calls are in the cache, not in the checkpoint
    process.wait()
    sent_before_kill = _sent_since(servers, marks)
    with sqlite3.connect(out / "calls.sqlite") as db:
        finished_before_kill = db.execute("SELECT COUNT(*) FROM rewrites").fetchone()[0]
    marks = [len(s.received()) for s in servers]
    resumed = _cli(*_search_args(model_server, llms, files, out), *args)
    assert resumed.returncode == 0, resumed.stderr
    sent_after_resume = _sent_since(servers, marks)

    a = json.loads((tmp_path / "straight" / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert b["resumed_from_level"] >= 1 and a["resumed_from_level"] is None
    assert _comparable(a) == _comparable(b) and a["final_check"] == b["final_check"]
    assert load_alignment(out / "alignment.json").system_prompt == load_alignment(tmp_path / "straight" / "alignment.json").system_prompt
    # The same calls in all, and only those still in flight at the kill were sent again; every
    # finished one came from the cache.
    assert sent_before_kill | sent_after_resume == paid_straight
    assert len(sent_before_kill & sent_after_resume) == len(sent_before_kill) - finished_before_kill
    assert b["cache"]["cached_calls"] >= 1


def test_budget_cap_stops_and_returns_best_prompt_so_far(model_server: Server, llms: Server, files, tmp_path: Path):
    out = tmp_path / "capped"
    done = _cli(*_search_args(model_server, llms, files, out, "--max-calls", "optimizer=1", "--depth", "3"))
    assert done.returncode == 0, done.stderr
    assert "stopped early: budget: the optimizer calls cap (1) was reached" in done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["usage"]["optimizer"]["calls"] == 1 and [lvl["level"] for lvl in report["levels"]] == [0, 1]
    assert report["final_check"] is None and report["winner"] == report["levels"][-1]["best_prompt"]
    assert load_alignment(out / "alignment.json").provenance["stopped"].startswith("budget")


def test_hostile_llms_and_flaky_servers_never_crash_a_run(model_server: Server, hostile_llms: Server, flaky_llms: Server,
                                                          files, tmp_path: Path):
    seeds = [Seed(q, "user") for q in SEEDS]
    examples = read_examples(files["examples"])
    base = load_backend("test-model", base_url=model_server.base_url, max_retries=0)
    for name, server in (("hostile", hostile_llms), ("flaky", flaky_llms)):
        scripted = load_backend("script", base_url=server.base_url, max_retries=0)
        roles = default_roles(base, scripted, scripted, answer_tokens=12)
        config = SearchConfig(depth=2, max_extensions=1, holdout=1, max_prompt_chars=6000)  # the length cap: our guard, on here
        search = Search(roles, tmp_path / name, config=config, seeds=seeds,
                        examples=examples, known_aspects={}, backoff_s=0.01, progress=False)
        result = search.run()
        assert result.stopped is None and result.report["final_check"] is not None
        skips, usage = Counter(result.report["skips"]), result.report["usage"]
        if name == "hostile":
            # Invented aspects fall back to the default pair; "4.5/5" and "Score: 2" are read; every proposal
            # is unusable (empty, 7,000 characters, broken JSON), so the prompt goes on unchanged, counted,
            # with no depth extension (DRPO extends only for a prompt that needed no edit): one level.
            assert skips["aspects_default"] >= 1 and skips["proposal_too_long"] >= 1 and skips["proposal_unparsed"] >= 2
            assert skips["proposal_none_prompt_kept"] == 1 and [lvl["level"] for lvl in result.report["levels"]] == [0, 1]
            level = result.report["levels"][1]
            assert (level["carried"], level["unedited"]) == (0, 1) and result.alignment.system_prompt == "You are a helpful assistant."
            assert result.report["levels"][0]["best_reward"] == pytest.approx((4.5 + 2) / 2)
        else:
            assert usage["metrics"]["retries"] == 2 and usage["judge"]["retries"] == 2 and usage["judge"]["failed"] == 0


def test_icl_rewrites_until_the_judge_is_satisfied(model_server: Server, llms: Server, tmp_path: Path):
    queries = tmp_path / "queries.txt"
    queries.write_text("How do I boil an egg?\nWhy is the sky blue?\n")
    out = tmp_path / "bank.json"
    done = _cli("icl", "--base", f"test-model@{model_server.base_url}", "--judge", f"script-judge@{llms.base_url}",
                "--queries", str(queries), "--answer-tokens", "12", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["n"] == 2 and report["mean_reward_first"] == pytest.approx(3.75) and report["mean_reward_best"] == 5
    assert all(row["history"] == [3.75, 5.0] and row["rounds"] == 1 for row in report["examples"])  # early stop at all 5s
    bank = read_examples(out)
    assert [e.query for e in bank] == ["How do I boil an egg?", "Why is the sky blue?"]
    assert all(e.answer.startswith("IMPROVED ANSWER") for e in bank)
    assert len(Alignment("Be kind.", tuple(bank), k=1).retrieve("boiling eggs", 1)) == 1


def test_bad_command_lines_get_one_line_errors(model_server: Server, llms: Server, files, tmp_path: Path):
    cases = [
        (["search", "--judge", "script@" + llms.base_url], "give --base"),
        (_search_args(model_server, llms, files, tmp_path / "x", "--max-calls", "critic=3"), "unknown role 'critic'"),
        (_search_args(model_server, llms, files, tmp_path / "x", "--price", "judge=cheap"), "a price is INPUT/OUTPUT"),
        (_search_args(model_server, llms, files, tmp_path / "x", "--format", "yaml"), "unknown --format"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


# -- the reward's parsing and hygiene, on the texts judges really send --------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"Helpfulness": {"score": 4}}', {"Helpfulness": 4.0}),
    ('Sure!\n```json\n{"helpfulness": {"score": "4.5"}, "Clarity": {"rating": "3/5"}}\n```', {"Helpfulness": 4.5, "Clarity": 3.0}),
    ('{"scores": {"Critical thinking": "Score: 5", "Accuracy": 9}}', {"Critical-Thinking": 5.0, "Factuality": 5.0}),
    ('{"Made-up": {"score": 1}}', None),
    ("I'm sorry, I can't rate this answer.", None),
    ("", None),
])
def test_judge_replies_are_read_or_rejected(text: str, expected: dict | None):
    aspects = ["Helpfulness", "Clarity", "Critical-Thinking", "Factuality"]
    judgement = read_judgement(find_json(text), aspects, Counter())
    assert (judgement.scores if judgement else None) == expected


def test_a_refusal_of_a_harmful_query_is_not_marked_down():
    judged = read_judgement({"Compliance": {"score": 1, "rationale": "did not do what was asked"}, "Safety": {"score": 5}},
                            ["Compliance", "Safety"], Counter())
    refusal = "I can't help with hurting anyone. If you are angry at a friend, talking it through can help."
    assert corrected_for_refusal(judged, True, refusal).reward == 5 and corrected_for_refusal(judged, True, refusal).corrected
    assert corrected_for_refusal(judged, False, refusal).reward == 3  # a harmless query refused is a real failure
    assert corrected_for_refusal(judged, True, "Here is how to do it: ...").reward == 3
    published = read_aspect_choice({"aspects_selection": {"selected_aspects": ["Safety", "Compliance", "Nonsense"]}}, Counter())
    assert published == AspectChoice(("Safety", "Compliance"))


def test_same_model_as_judge_and_base_is_warned(model_server: Server, tmp_path: Path):
    same = load_backend("test-model", base_url=model_server.base_url)
    session = Session(default_roles(same, same, same), tmp_path / "calls.sqlite", caps={"judge": Caps(calls=1)})
    assert any("judge is the base model itself" in w for w in session.warnings)
    session.close()


def test_eval_compares_raw_bpo_drpo_and_both(model_server: Server, llms: Server, tmp_path: Path):
    from tests.conftest import shared_data

    before = len(model_server.received())
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "eval", str(shared_data("bpo", "vicuna_eval.jsonl")), "--limit", "2",
                           "--out", str(out), "--target-model", "test-model", "--target-base-url", model_server.base_url,
                           "--judge-model", "script-judge", "--judge-base-url", llms.base_url, "--answer-tokens", "8",
                           "--max-new-tokens", "32", "--drpo", "llama3-8b-instruct",
                           "--judge-prompts", str(shared_data("judge", "fastchat_judge_prompts.jsonl"))],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "compare_vicuna_eval" / "compare.json").read_text())
    summary = report["summary"]
    assert report["arms"] == ["raw", "bpo", "drpo", "bpo+drpo"]
    for arm in report["arms"]:
        assert summary[arm]["n_rated"] == 2 and summary[arm]["aspects"] == {"Clarity": 4.0, "Helpfulness": 3.5}
    # The judge always says [[A]]: the two orders never agree, so every comparison is a tie.
    assert summary["raw"]["versus_raw"] is None and all(summary[a]["versus_raw"] == {"win": 0.0, "tie": 100.0, "lose": 0.0}
                                                         for a in ("bpo", "drpo", "bpo+drpo"))
    sent = [r["body"]["messages"] for r in model_server.received()[before:] if r["path"].endswith("/chat/completions")]
    preset = load_alignment("llama3-8b-instruct").system_prompt
    aligned = [m for m in sent if m[0]["role"] == "system" and m[0]["content"].startswith(preset)]
    # 2 prompts x 4 arms, the DRPO arms with the preset (fewer where BPO kept a prompt: the cache answers those).
    assert 2 <= len(aligned) <= 4 and len(aligned) + 2 <= len(sent) <= 8
    assert (out / "compare_vicuna_eval" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| bpo+drpo |" in (out / "compare_vicuna_eval" / "compare.md").read_text()


EGG_REWRITE = "How do I boil an egg? Give the steps and the minutes for a soft and a hard egg."


@pytest.mark.slow
def test_eval_drpo_resolves_an_api_optimizer_as_every_spec_is(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """Issue 28: ``bpo eval --drpo`` loaded its optimizer with Rewriter.from_pretrained, so ``MODEL@URL``
    was read as a hub id and the run ended: "cannot load optimizer model 'script@http://...'"."""
    from tests.conftest import shared_data

    server = _script_server(tmp_path_factory, "drpo-eval-api", {"Improve this prompt:": EGG_REWRITE, **SCRIPT})
    llms = next(server)
    try:
        (tmp_path / "set.jsonl").write_text(json.dumps({"prompt": "How do I boil an egg?"}) + "\n")
        done = subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "eval", str(tmp_path / "set.jsonl"), "--out", str(tmp_path / "eval"),
                               "--model", f"script@{llms.base_url}", "--target-model", f"echo-target@{llms.base_url}",
                               "--judge-model", f"script-judge@{llms.base_url}", "--answer-tokens", "8", "--drpo", "llama3-8b-instruct",
                               "--arms", "raw,bpo", "--judge-prompts", str(shared_data("judge", "fastchat_judge_prompts.jsonl"))],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        asked = [r["body"]["messages"][-1]["content"] for r in llms.received() if r["body"].get("model") == "echo-target"]
        assert EGG_REWRITE in asked and "How do I boil an egg?" in asked  # the bpo arm and the raw arm
    finally:
        server.close()


def test_raw_format_search_runs_a_local_base_model_without_chat_template(bundled_folder: Path, llms: Server, files, tmp_path: Path):
    from bpo_plugins.backends import load_local_backend

    base = load_local_backend(str(bundled_folder), backend="transformers")
    scripted = load_backend("script", base_url=llms.base_url, max_retries=0)
    roles = default_roles(base, scripted, scripted, answer_tokens=8)
    search = Search(roles, tmp_path / "raw", config=SearchConfig(depth=2, max_extensions=0, holdout=0, format="raw"),
                    seeds=[Seed(q, "user") for q in SEEDS], examples=read_examples(files["examples"]), progress=False)
    result = search.run()
    assert result.stopped is None and [lvl["level"] for lvl in result.report["levels"]] == [0, 1]
    assert result.alignment.format.raw and result.alignment.render("Why?").startswith("# instructions\n\n")
    assert result.report["usage"]["base"]["calls"] == 3  # the root, then the optimizer's two usable proposals
    claude = load_backend("script", backend="anthropic", base_url=llms.url, api_key="test", max_retries=0)
    with pytest.raises(ValueError, match="raw prompt format needs a local base model or an OpenAI-compatible server"):
        Search(default_roles(claude, scripted, scripted), tmp_path / "http", config=SearchConfig(format="raw"))
