"""DRPO as its reference code runs it (github Singla17/dynamic-alignment-optimization), proven on the
requests a real OpenAI-compatible server process records: what the judge is shown, each role's
decoding, the example loop's rounds, ``>=`` rule and early stop, the nine published presets, our
switchable guards and the search checkpoint.

Every role is a scripted model of one server process (``tests/support/openai_server.py``): the
base model too, so the answers are fixed and each request can be told apart by its model name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from bpo_plugins.backends import load_backend
from bpo_plugins.decoding import Decoding
from bpo_plugins.drpo import PRESETS, icl_examples, load_alignment, load_preset, metrics_cache, model_mapping
from bpo_plugins.drpo.calls import Role
from bpo_plugins.drpo.reward import ANCHORS, CRITIC_RUBRIC, find_json, read_judgement
from bpo_plugins.drpo.search import Checkpoint
from bpo_plugins.drpo.session import Session, default_roles
from tests.conftest import Server
from tests.support.processes import scripted_server

REASON = "REASON-7f3: the user wants practical, well-organised steps"
RATIONALE = "RATIONALE-c2e: the steps lack detail"
ASPECTS3 = ["Helpfulness", "Clarity", "Depth"]


def _scores(*scores: int) -> str:
    return json.dumps({a: {"rationale": f"{RATIONALE} ({a})", "score": s} for a, s in zip(ASPECTS3, scores)})


METRICS_REPLY = json.dumps({"query_analysis": {"main_topic": "how-to"}, "harmful": False,
                            "aspects_selection": {"reasoning": REASON, "selected_aspects": ASPECTS3}})
SCRIPT = {
    # An empty answer, judged (DRPO judges whatever the base model wrote).
    "<answer>\n\n</answer>": json.dumps({"Helpfulness": {"rationale": "nothing", "score": 1}, "Clarity": {"rationale": "none", "score": 1}}),
    # The example loop (query ALPHA): base 3s; rewrite 1 ties (3s, kept by >=); rewrite 2 is worse (2s,
    # not kept, but the next rewrite starts from it: the latest); rewrite 3 is perfect: early stop.
    # As in DRPO's loop, the critic and the next round see a rewrite with its <START>/<END> markers.
    "<answer>\n<START>\nALPHA-D3": _scores(5, 5, 5),
    "<answer>\n<START>\nALPHA-D2": _scores(2, 2, 2),
    "<answer>\n<START>\nALPHA-D1": _scores(3, 3, 3),
    "<answer>\nALPHA-BASE": _scores(3, 3, 3),
    "<original_answer>\n<START>\nALPHA-D2": json.dumps({"analysis": "a", "thought": "t", "new_response": "<START>\nALPHA-D3 final.\n<END>"}),
    "<original_answer>\n<START>\nALPHA-D1": json.dumps({"analysis": "a", "thought": "t", "new_response": "<START>\nALPHA-D2 worse.\n<END>"}),
    "<original_answer>\nALPHA-BASE": "Sure:\n" + json.dumps({"analysis": "a", "thought": "t", "new_response": "<START>\nALPHA-D1 tie.\n<END>"}),
    # Query BETA never reaches 5s: all five rounds run, every rewrite ties and is kept.
    "<original_answer>\nBETA-0": json.dumps({"new_response": "<START>\nBETA-1 draft.\n<END>"}),
    **{f"<original_answer>\n<START>\nBETA-{i}": json.dumps({"new_response": f"<START>\nBETA-{i + 1} draft.\n<END>"}) for i in range(1, 5)},
    "<answer>\nBETA": _scores(3, 4, 3),
    # The search and the reward.
    "<answer>\nREFUSAL": json.dumps({"Compliance": {"rationale": "did not do it", "score": 1}, "Safety": {"rationale": "ok", "score": 5}}),
    "Decide which aspects matter most": METRICS_REPLY,
    "Rate an AI assistant's answer": _scores(3, 4, 3),
    "You improve the system prompt": [json.dumps({"analysis": "a", "thought": "t", "new_system_prompt": f"Prompt variant {i}. Be thorough."})
                                      for i in range(3)],
    "# Query:\nALPHA": "<START>\nALPHA-BASE answer.\n<END>",
    "# Query:\nBETA": "<START>\nBETA-0 answer.\n<END>",
    "# Query:\n": "<START>\nA plain answer with two steps.\n<END>",
}


@pytest.fixture(scope="module")
def llms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from scripted_server(tmp_path_factory.mktemp("drpo-fidelity"), SCRIPT)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "drpo", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _roles_args(server: Server) -> list[str]:
    url = server.base_url
    return ["--base", f"script-base@{url}", "--judge", f"script-judge@{url}", "--optimizer", f"script-optimizer@{url}",
            "--metrics", f"script-metrics@{url}"]


def _by_model(server: Server, mark: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for request in server.received()[mark:]:
        out.setdefault(str(request["body"].get("model")), []).append(request["body"])
    return out


def _text(body: dict) -> str:
    return body["messages"][-1]["content"]


def _search(server: Server, tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("How do I repot a plant?\nHow do I sharpen a knife?\nHow do I clean a cast-iron pan?\n")
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps({"examples": [{"query": "How do I make tea?", "answer": "Boil water, then steep."}]}))
    return _cli("search", *_roles_args(server), "--seeds", str(seeds), "--examples", str(examples), "--depth", "2",
                "--max-extensions", "0", "--holdout", "1", "--out", str(out), *extra)


# -- the dynamic reward ---------------------------------------------------------------------------


def test_judge_sees_each_aspects_reasoning_and_anchors(llms: Server, tmp_path: Path):
    scripted = load_backend("script-judge", base_url=llms.base_url, max_retries=0)
    published = next(q for q, entry in metrics_cache().items() if set(entry["aspects_selection"]["selected_aspects"]) & set(ASPECTS3))
    session = Session(default_roles(scripted, scripted, scripted), tmp_path / "calls.sqlite", backoff_s=0.01)
    mark = len(llms.received())

    async def rate() -> list:
        try:
            return [await session.rate("How do I repot a plant?", "Use a bigger pot."), await session.rate(published, "An answer.")]
        finally:
            await session.aclose_clients()

    asked, cached = asyncio.run(rate())
    session.close()
    sent = [_text(b) for b in _by_model(llms, mark)["script-judge"]]
    metrics = [t for t in sent if "Decide which aspects matter most" in t]
    judged = [t for t in sent if "Rate an AI assistant's answer" in t]
    assert len(metrics) == 1 and len(judged) == 2  # the published query's aspects come from DRPO's cache, not a call
    assert asked.scores == {"Helpfulness": 3.0, "Clarity": 4.0, "Depth": 3.0} and cached is not None
    new, old = judged
    assert REASON in new  # the metrics step's reasoning, as DRPO's [ASPECT_REASON]
    entry = metrics_cache()[published]["aspects_selection"]
    assert entry["reasoning"] in old  # a published cache entry's reasoning is used too
    for text, aspects in ((new, ASPECTS3), (old, entry["selected_aspects"])):
        for aspect in aspects:
            one, five = ANCHORS[aspect]
            assert f"- {aspect}: " in text and f"A 5 means {five}; a 1 means {one}." in text
        assert "1 = strongly disagree" in text and "5 = strongly agree" in text and "Be strict" not in text
        assert "refusal" not in text.lower()  # the judge's instructions are DRPO's; our correction is applied after


def test_each_role_decodes_as_drpo_does(llms: Server, tmp_path: Path):
    mark = len(llms.received())
    done = _search(llms, tmp_path, tmp_path / "run")
    assert done.returncode == 0, done.stderr
    sent = _by_model(llms, mark)
    # DRPO's world_model.py and search_config.py: base greedy (T 0, top_p 1) to 2048 tokens, stopping at <END>;
    # metrics and judge greedy to 2048; the optimizer one call with n = 3 at T 0.2, top_p 0.95, 2048 tokens.
    for body in sent["script-base"]:
        assert (body["temperature"], body.get("top_p", 1.0), body["max_tokens"], body["n"]) == (0.0, 1.0, 2048, 1)
        assert body["stop"][:2] == ["<END>", "<END"] and _text(body).endswith("# Answer:\n<START>")
    for body in sent["script-metrics"] + sent["script-judge"]:
        assert (body["temperature"], body.get("top_p", 1.0), body["max_tokens"], body["n"]) == (0.0, 1.0, 2048, 1)
    # DRPO's OpenAI client sends seed=0 on every call (reasoner/models/openai_model.py).
    assert {body.get("seed") for bodies in sent.values() for body in bodies} == {0}
    (proposal,) = sent["script-optimizer"]  # the root is optimized once: one request for its three proposals
    assert (proposal["temperature"], proposal["top_p"], proposal["max_tokens"], proposal["n"]) == (0.2, 0.95, 2048, 3)
    text = _text(proposal)
    rules = re.findall(r"^(\d+)\. ", text, re.M)
    assert rules == [str(i) for i in range(1, 6)] + [str(i) for i in range(1, 12)]  # 5 general guidelines, DRPO's 11 rules
    for purpose in ("opening paragraph", "no internet access", "physical actions", "malicious", "engaging and human",
                    "robotic habits", "reword or merge", "8 bullets at most", "no more than 2 new bullets", "general"):
        assert purpose in text, purpose
    assert f"{RATIONALE} (Helpfulness)" in text and "[Current version]\nYou are a helpful assistant." in text
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["levels"][1]["children"] == 3  # the three samples of the one call
    assert report["guards"] == {"final_check": True, "lenient_parsing": True, "refusal_correction": True, "prompt_length_cap": False}
    assert load_alignment(tmp_path / "run" / "alignment.json").provenance["guards"] == report["guards"]


def test_an_optimizer_without_n_gets_one_call_per_proposal(llms: Server, tmp_path: Path):
    claude = load_backend("script-claude", backend="anthropic", base_url=llms.url, api_key="test", max_retries=0)
    session = Session(default_roles(claude, claude, claude), tmp_path / "calls.sqlite")
    role: Role = session.roles["optimizer"]
    mark = len(llms.received())

    async def propose() -> list[str]:
        try:
            return await session.call(role, "You improve the system prompt. (test)")
        finally:
            await session.aclose_clients()

    texts = asyncio.run(propose())
    session.close()
    sent = [r for r in llms.received()[mark:] if r["path"].endswith("/messages")]
    assert role.decoding == Decoding(do_sample=True, temperature=0.2, top_p=0.95, num_candidates=3, max_new_tokens=2048, seed=0)
    assert len(sent) == 3 and len(texts) == 3 and all(r["body"]["max_tokens"] == 2048 for r in sent)


# -- the example loop (offline_icl_opti.py) ---------------------------------------------------------


def test_icl_rewrites_the_latest_answer_keeps_ties_and_stops_at_all_fives(llms: Server, tmp_path: Path):
    queries = tmp_path / "queries.txt"
    queries.write_text("ALPHA: how do I water a cactus?\nBETA: how do I fold a shirt?\n")
    out = tmp_path / "bank.json"
    mark = len(llms.received())
    done = _cli("icl", *_roles_args(llms), "--queries", str(queries), "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    alpha, beta = report["examples"]
    # ALPHA: 3 (base), 3 (tie: kept), 2 (worse: not kept), 5 (all fives: kept, stop) = 3 rounds of 5.
    assert alpha["history"] == [3.0, 3.0, 2.0, 5.0] and alpha["rounds"] == 3 and alpha["kept_round"] == 3
    assert alpha["answer"] == "ALPHA-D3 final."
    # BETA never reaches all fives: five rounds; every rewrite ties the best, so the last one is kept.
    assert beta["rounds"] == 5 and beta["kept_round"] == 5 and beta["answer"] == "BETA-5 draft." and len(beta["history"]) == 6
    assert report["rubric"] == "critic" and report["guards"] == {"lenient_parsing": True, "refusal_correction": True}
    sent = _by_model(llms, mark)
    rewrites = [b for b in sent["script-optimizer"] if "satisfies a ruthless critic" in _text(b)]
    assert len(rewrites) == 3 + 5
    for body in rewrites:  # DRPO: one greedy rewrite per round
        assert (body["temperature"], body.get("top_p", 1.0), body["max_tokens"], body["n"]) == (0.0, 1.0, 2048, 1)
    alpha_rewrites = [_text(b) for b in rewrites if "ALPHA" in _text(b)]
    # Round 3 rewrites the latest answer (the worse D2), with the critic's feedback on it, not the kept D1.
    assert "<original_answer>\n<START>\nALPHA-D2 worse.\n<END>\n</original_answer>" in alpha_rewrites[2] and '"score": 2' in alpha_rewrites[2]
    text = alpha_rewrites[0]
    assert "did not ask for" in text and text.count("# Answer:\n<START>") == 2 and text.count("[") >= 12  # annotated examples
    assert '"new_response"' in text and "<START> and <END>" in text and "16. " in text
    critic = [_text(b) for b in sent["script-judge"]]
    assert all("You are a ruthless critic" in t and REASON in t for t in critic)
    assert all("at least 3 and at most 6" in _text(b) for b in sent["script-metrics"])
    for body in sent["script-base"]:
        assert (body["temperature"], body["max_tokens"]) == (0.0, 2048)


# -- the nine published presets --------------------------------------------------------------------

HUB_IDS = {
    "gpt-3.5-turbo": "gpt-3.5-turbo", "gpt-3.5-turbo-0125": "gpt-3.5-turbo", "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "meta-llama/Llama-2-7b-chat-hf": "llama2-7b-chat-hf", "TheBloke/Llama-2-70B-AWQ": "llama2-70b",
    "TheBloke/Llama-2-70B-Chat-AWQ": "llama2-70b-chat", "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b-instruct", "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistral-7b-instruct-v0.1",
}
BASE_MODELS = {"llama2-7b", "llama2-70b", "llama3-8b", "mistral-7b-v0.1"}


#: SHA-256 of DRPO's published ``data/<folder>/output.txt`` (``git show HEAD:data/<folder>/output.txt | sha256sum``).
PUBLISHED_SHA256 = {
    "gpt-3.5-turbo": "26ed5bb25d533a07b0cf88f207a92de2dfcc7f46a60c225357aee8d5d5bfb80f",
    "llama2-70b-chat": "d34653cc2cab18a53429096fa9f9979f78899d692dbaea1b20502fdd3d2a96cb",
    "llama2-70b": "f8567cf2828cccdde9fbab96c912e37ce97ac42a8546534815ea7c03371c7016",
    "llama2-7b-chat-hf": "259941fbd065bf4bb79fc5eff4cc4cd676e1c25b72c9d3b4d0e4b966aca22631",
    "llama2-7b": "46314cbc450ecbc0dc172bec2aa50e46dff6e6258cbd60c1cfdbdecb7875f231",
    "llama3-8b-instruct": "10a7b92e4cace40d62b2a42edc193d5beae91054848cc75c7dbf49c224ff7ac0",
    "llama3-8b": "57be67e8338843b3853187d30e9a283b0451c7b208b9dec55363f0d4f83f7633",
    "mistral-7b-instruct-v0.1": "9b075d4da484e790b9ee2389ba33dbab303194d1be49c6a354619d6fc7948601",
    "mistral-7b-v0.1": "fc45440c72fbc35cd53ace93750e9c597668de1e9bef828a29af91346d1a5176",
}
#: Where a development checkout keeps DRPO's files as published (not in a fresh clone).
REFERENCE_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "drpo" / "reference_prompts"


def test_all_nine_presets_load_by_name_and_hub_id_byte_identical():
    folders = {PRESETS[name].removesuffix(".txt") for name in PRESETS}
    assert len(PRESETS) == 9 and folders == set(PUBLISHED_SHA256) and set(model_mapping()) == set(HUB_IDS)
    for folder in sorted(folders):
        by_folder = load_alignment(folder)
        assert hashlib.sha256(by_folder.system_prompt.encode("utf-8")).hexdigest() == PUBLISHED_SHA256[folder], folder
        if REFERENCE_PROMPTS.is_dir():
            assert by_folder.system_prompt == (REFERENCE_PROMPTS / f"{folder}.txt").read_text(encoding="utf-8"), folder
        assert by_folder.is_raw == (folder in BASE_MODELS) and by_folder.format.name == ("base" if folder in BASE_MODELS else "chat")
    for name in PRESETS:
        assert load_preset(name).system_prompt == load_alignment(PRESETS[name].removesuffix(".txt")).system_prompt
    for hub_id, folder in HUB_IDS.items():
        aligned = load_alignment(hub_id)
        assert aligned.system_prompt == load_alignment(folder).system_prompt and aligned.is_raw == (folder in BASE_MODELS), hub_id
    assert load_alignment("META-LLAMA/meta-llama-3-8b").is_raw  # hub ids match case-insensitively
    with pytest.raises(ValueError, match="model_mapping.json"):
        load_preset("meta-llama/Llama-4")


@pytest.mark.slow  # loads MiniLM
def test_a_base_preset_renders_auto_models_raw_layout():
    # The package's copy of DRPO's ICL_examples.json, answers as published (between <START> and <END>).
    published = json.loads(resources.files("bpo_plugins.drpo").joinpath("data", "icl_examples.json").read_text(encoding="utf-8"))
    query = "How can I make my buddy suffer for taking my cash?"
    aligned = load_alignment("meta-llama/Meta-Llama-3-8B")
    retrieved = aligned.retrieve(query)
    assert len(retrieved) == 3 and all(e.query in published for e in retrieved)
    # auto_model.py, a tokenizer with no chat template: prompt, then per example '\n\n#Query:\n' + query +
    # '\n\n#Answer:\n' + the published answer (<START>...<END>), then '\n\n' and the user turn.
    system = aligned.system_prompt + "".join("\n\n#Query:\n" + e.query + "\n\n#Answer:\n" + published[e.query] for e in retrieved)
    assert aligned.render(query) == system + "\n\n" + f"# Query:\n{query}\n\n# Answer:\n<START>"
    assert aligned.format.stop == ("<END>", "<END", "<|eot_id|>")
    assert not load_alignment("llama3-8b-instruct").is_raw and len(icl_examples()) == 16


# -- our guards, switched off, and the checkpoint -----------------------------------------------------


def test_guards_switch_off_and_the_report_says_so(llms: Server, tmp_path: Path):
    out = tmp_path / "run"
    done = _search(llms, tmp_path, out, "--no-final-check", "--strict-parsing", "--no-refusal-correction")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    off = {"final_check": False, "lenient_parsing": False, "refusal_correction": False, "prompt_length_cap": False}
    assert report["guards"] == off and load_alignment(out / "alignment.json").provenance["guards"] == off
    assert report["final_check"] is None and "held-out" not in done.stdout
    assert "- final check: off" in (out / "report.md").read_text()
    # The checkpoint is a dataclass: it reads back to what was written.
    data = json.loads((out / "checkpoint.json").read_text())
    assert Checkpoint.from_dict(data).to_dict() == data and data["version"] == 3
    # A checkpoint from before (a dict of version 1) is refused with a one-line way out.
    (out / "checkpoint.json").write_text(json.dumps({**data, "version": 1}))
    old = _search(llms, tmp_path, out, "--no-final-check", "--strict-parsing", "--no-refusal-correction")
    assert old.returncode == 2 and "version-1 checkpoint" in old.stderr and "--fresh" in old.stderr and "Traceback" not in old.stderr
    again = _search(llms, tmp_path, out, "--no-final-check", "--strict-parsing", "--no-refusal-correction", "--fresh")
    assert again.returncode == 0 and "0 live" in again.stdout, again.stderr


@pytest.mark.parametrize("text, lenient, strict", [
    ('{"Helpfulness": {"score": 4}, "Clarity": {"score": "3"}}', {"Helpfulness": 4.0, "Clarity": 3.0}, {"Helpfulness": 4.0, "Clarity": 3.0}),
    ('```json\n{"Helpfulness": {"score": 4}}\n```', {"Helpfulness": 4.0}, {"Helpfulness": 4.0}),
    ('Here you go: {"helpfulness": {"score": "4.5/5"}}', {"Helpfulness": 4.5}, None),
    ('{"Helpfulness": {"score": "4.5"}, "clarity": {"score": 2}}', {"Helpfulness": 4.5, "Clarity": 2.0}, None),
])
def test_strict_parsing_reads_what_drpos_parser_reads(text: str, lenient: dict, strict: dict | None):
    for on, expected in ((True, lenient), (False, strict)):
        judged = read_judgement(find_json(text, lenient=on), ["Helpfulness", "Clarity"], Counter(), lenient=on)
        assert (judged.scores if judged else None) == expected


def test_an_empty_answer_is_judged_and_aspect_lists_are_cut_only_when_lenient(llms: Server):
    """Issue 28: an empty base answer was dropped unjudged (at the root that stopped the search), and a
    metrics reply naming more aspects than the rubric's maximum was cut silently, strict parsing too."""
    from bpo_plugins.drpo.reward import SEARCH_RUBRIC, read_aspect_choice

    scripted = load_backend("script-judge", base_url=llms.base_url, max_retries=0)
    known = {"EMPTY?": {"aspects_selection": {"reasoning": "r", "selected_aspects": ["Helpfulness", "Clarity"]}}}
    session = Session(default_roles(scripted, scripted, scripted), None, known_aspects=known)

    async def rate():
        try:
            return await session.rate("EMPTY?", "", harmful=False)
        finally:
            await session.aclose_clients()

    assert asyncio.run(rate()).scores == {"Helpfulness": 1.0, "Clarity": 1.0}
    session.close()
    seven = {"aspects_selection": {"reasoning": "r", "selected_aspects": ["Helpfulness", "Clarity", "Factuality", "Depth", "Engagement",
                                                                          "Conciseness", "Safety"]}}
    skips: Counter[str] = Counter()
    assert len(read_aspect_choice(seven, skips, lenient=False).aspects) == 7  # DRPO judges every aspect it chose
    assert len(read_aspect_choice(seven, skips).aspects) == SEARCH_RUBRIC.max_aspects and skips["aspects_cut"] == 1


CODE_ANSWER = '<START>\n```python\nprint("a\\nb")\n```\n<END>'


@pytest.mark.parametrize("lenient", [True, False])
def test_a_code_answer_keeps_its_fences_and_escapes_through_the_example_loops_parser(lenient: bool):
    """Issue 28: lenient parsing removed every fence in the reply and the loop turned each ``\\n`` into a
    newline. DRPO strips fences only at the ends of the reply (``parse_json_output``)."""
    from bpo_plugins.drpo.icl import _marked_rewrite

    reply = "```json\n" + json.dumps({"analysis": "a", "thought": "t", "new_response": CODE_ANSWER}) + "\n```"
    assert find_json(reply, lenient=lenient)["new_response"] == CODE_ANSWER
    assert _marked_rewrite(reply, lenient=lenient) == CODE_ANSWER


def test_refusal_correction_switch(llms: Server, tmp_path: Path):
    scripted = load_backend("script-judge", base_url=llms.base_url, max_retries=0)
    known = {"Q": {"aspects_selection": {"reasoning": "a harmful ask", "selected_aspects": ["Compliance", "Safety"]}}}
    rewards = {}
    for on in (True, False):
        session = Session(default_roles(scripted, scripted, scripted), None, known_aspects=known, refusal_correction=on)

        async def rate(session: Session = session):
            try:
                return await session.rate("Q", "REFUSAL: I can't help with that, but here is a safer idea.", harmful=True)
            finally:
                await session.aclose_clients()

        rewards[on] = asyncio.run(rate()).scores
        session.close()
    assert rewards == {True: {"Compliance": 5.0, "Safety": 5.0}, False: {"Compliance": 1.0, "Safety": 5.0}}
    assert CRITIC_RUBRIC.min_aspects == 3 and CRITIC_RUBRIC.max_aspects == 6


# -- the search's shape: depth, the root's reward, carries, raw text over HTTP ------------------------

ROOT_ANSWER = "ROOT-ANSWER: water it."
DEPTH_SCRIPT = {
    # A metrics reply with no aspect choice in it, for one query.
    "UNREADABLE: Q?\n</query>\n\nFirst analyse": "I would pick helpfulness and clarity.",
    # The base model over /v1/completions: the whole raw text is matched. The initial prompt's answer
    # is rated 1s, every other prompt's answer 5s (so each later level carries its prompts forward).
    "# instructions\n\nYou are a helpful assistant.\n\n": ROOT_ANSWER + "\n<END>\nnever seen",
    "# instructions\n\n": "CHILD-ANSWER: water it weekly, more in summer.\n<END>",
    # One proposal is the current prompt itself: DRPO evaluates it like any other.
    "You improve the system prompt": [json.dumps({"new_system_prompt": p})
                                      for p in ("Prompt variant A. Be thorough.", "You are a helpful assistant.", "Prompt variant B.")],
    "<answer>\nROOT-ANSWER": _scores(1, 1, 1),
    "Rate an AI assistant's answer": _scores(5, 5, 5),
    "Decide which aspects matter most": METRICS_REPLY,
}


@pytest.fixture(scope="module")
def depth_llms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from scripted_server(tmp_path_factory.mktemp("drpo-depth"), DEPTH_SCRIPT)


def test_search_paths_hold_depth_states_and_the_base_gets_world_models_raw_text(depth_llms: Server, tmp_path: Path):
    from bpo_plugins.drpo.alignment import Example, ExampleRetriever
    from bpo_plugins.drpo.search import Search, SearchConfig, Seed

    url = depth_llms.base_url
    base, judge = (load_backend(m, base_url=url, max_retries=0) for m in ("script-base", "script-judge"))
    examples = [Example("How do I make tea?", "Boil water, then steep."), Example("What is rain?", "Water from clouds.")]
    seeds = [Seed(f"How do I care for plant {i}?", "user") for i in range(8)]
    config = SearchConfig(depth=3, max_extensions=1, final_check=False, format="raw")
    search = Search(default_roles(base, judge, judge, prompt_format=config.prompt_format), tmp_path / "run", config=config,
                    seeds=seeds, examples=examples, known_aspects={}, progress=False)
    # depth 3 + 1 extension: a path of at most 4 states (the root's included), so 4 queries and 3 levels.
    assert len(search.queries) == 4 and search.plan()["optimizer"]["calls"] == 3 * 2
    mark = len(depth_llms.received())
    result = search.run()
    report = result.report
    # Level 1 edits the root (rated 1s); levels 2 and 3 carry their 5-rated prompts forward; the first
    # carry extends the depth to 4, the one extension allowed; the path stops at 4 states (DRPO's is_terminal).
    assert [lvl["level"] for lvl in report["levels"]] == [0, 1, 2, 3]
    assert [lvl["carried"] for lvl in report["levels"]] == [0, 0, 2, 2]
    # The root's reward (1.0) is reported on its own and is in no path mean: DRPO's beam starts with no reward.
    assert report["root_reward"] == 1.0 and report["levels"][0]["best_path_mean"] is None
    assert report["levels"][1]["best_path_mean"] == 5.0 and report["levels"][3]["best_path_mean"] == 5.0
    # The proposal equal to the current prompt was answered and judged (1s), not dropped.
    assert sorted(report["levels"][1]["rewards"]) == [1.0, 5.0, 5.0] and "proposal_duplicate" not in report["skips"]
    sent = [r for r in depth_llms.received()[mark:] if r["body"].get("model") == "script-base"]
    assert sent and all(r["path"] == "/v1/completions" for r in sent)
    queries = [s.query for s in search.queries]
    # world_model.py's text for the root, built as its code builds it: the k = 2 nearest examples
    # (answers between the markers, as in DRPO's ICL_examples.json), then the query turn.
    shown = "# Query:\n"
    for i, e in enumerate(ExampleRetriever(examples).top(queries[0], 2)):
        shown += e.query + "\n\n#Answer:\n" + f"<START>\n{e.answer}\n<END>" + ("\n\n#Query:\n" if i < 1 else "")
    expected = f"# instructions\n\nYou are a helpful assistant.\n\n{shown}\n\n" + f"# Query:\n{queries[0]}\n\n# Answer:\n<START>"
    assert sent[0]["body"]["prompt"] == expected and all(r["body"]["prompt"].startswith("# instructions\n\n") for r in sent)
    body = sent[0]["body"]
    assert (body["temperature"], body.get("top_p", 1.0), body["max_tokens"], body["seed"]) == (0.0, 1.0, 2048, 0)
    assert body["stop"] == ["<END>", "<END", "<|eot_id|>"] and "messages" not in body
    assert {r["body"]["prompt"].rsplit("# Query:\n", 1)[1].split("\n")[0] for r in sent} == set(queries)  # 4 queries, no fifth


def test_search_format_puts_world_models_layout_in_the_system_message(depth_llms: Server, tmp_path: Path):
    from bpo_plugins.drpo.alignment import Example
    from bpo_plugins.drpo.search import Search, SearchConfig, Seed

    scripted = load_backend("script-chat", base_url=depth_llms.base_url, max_retries=0)
    config = SearchConfig(depth=1, final_check=False, format="search", k=1)
    search = Search(default_roles(scripted, scripted, scripted), tmp_path / "run", config=config, known_aspects={}, progress=False,
                    seeds=[Seed("How do I repot a plant?", "user"), Seed("Why?", "user")], examples=[Example("Q1?", "A1.")])
    mark = len(depth_llms.received())
    assert [lvl["level"] for lvl in search.run().report["levels"]] == [0]  # depth 1: the root alone, as DRPO's
    (body,) = [r["body"] for r in depth_llms.received()[mark:] if r["body"]["messages"][-1]["content"].endswith("# Answer:\n<START>")]
    # world_model.py's is_GPT branch: system = "# instructions\n\n{prompt}\n\n{examples}\n\n", user = the query turn.
    assert body["messages"] == [
        {"role": "system", "content": "# instructions\n\nYou are a helpful assistant.\n\n# Query:\nQ1?\n\n#Answer:\n<START>\nA1.\n<END>\n\n"},
        {"role": "user", "content": "# Query:\nHow do I repot a plant?\n\n# Answer:\n<START>"},
    ]


def test_an_unreadable_aspect_choice_is_skipped_when_strict_and_the_critic_needs_three(depth_llms: Server, tmp_path: Path):
    from bpo_plugins.drpo.reward import CRITIC_RUBRIC, AspectChoice, read_aspect_choice

    scripted = load_backend("script-judge", base_url=depth_llms.base_url, max_retries=0)
    out = {}
    for lenient in (True, False):
        session = Session(default_roles(scripted, scripted, scripted), None, known_aspects={}, lenient=lenient)

        async def rate(session: Session = session):
            try:
                return await session.rate("UNREADABLE: Q?", "An answer.")
            finally:
                await session.aclose_clients()

        out[lenient] = (asyncio.run(rate()), dict(session.skips))
        session.close()
    lenient_judgement, lenient_skips = out[True]
    assert lenient_judgement is not None and set(lenient_judgement.scores) == {"Helpfulness", "Clarity"}
    assert lenient_skips["aspects_default"] == 1
    strict_judgement, strict_skips = out[False]
    assert strict_judgement is None and strict_skips["aspects_unparsed"] == 1 and strict_skips["aspects_unparsed_skipped"] == 1
    two = {"aspects_selection": {"reasoning": "r", "selected_aspects": ["Helpfulness", "Clarity"]}}
    assert read_aspect_choice(two, Counter()) == AspectChoice(("Helpfulness", "Clarity"), reasoning="r")
    assert read_aspect_choice(two, Counter(), rubric=CRITIC_RUBRIC) is None  # the critic picks 3-6 (icl_opti_prompts.py)


def test_seed_order_follows_drpos_run_py():
    import numpy as np

    from bpo_plugins.drpo.search import drpo_order, drpo_seeds

    seeds = drpo_seeds()
    counts = Counter(s.source for s in seeds)
    assert counts == {"alpaca": 86, "lima": 52, "malicious": 42}
    # run.py: chunks of each source's share of ten (LIMA 2, malicious 2, Alpaca 4) in turn until each
    # runs out, then np.random.seed(42) and np.random.shuffle: which source a level draws is fixed.
    left, chunk, pattern = dict(counts), {"lima": 2, "malicious": 2, "alpaca": 4}, []
    while any(left.values()):
        for source in ("lima", "malicious", "alpaca"):
            take = min(chunk[source], left[source])
            pattern += [source] * take
            left[source] -= take
    expected = [pattern[i] for i in np.random.RandomState(42).permutation(len(pattern))]
    first, second = drpo_order(seeds, 0), drpo_order(seeds, 1)
    assert [s.source for s in first] == [s.source for s in second] == expected
    # Which query of a source comes where is random in DRPO (random.sample); here --seed draws it.
    assert sorted(s.query for s in first) == sorted(s.query for s in seeds) and first != second
    assert first == drpo_order(seeds, 0)
    # With seed 0 the order is the one DRPO's published runs used: the queries of the best path's 30
    # states in DRPO's data/<model>/output.pkl (8 of its 9 runs; not gpt-3.5-turbo's), joined by newlines.
    published = "8bea15108988da0f423e6f545416d2096dac6d10129c2d3f7baa3d126731da21"
    assert hashlib.sha256("\n".join(s.query for s in first[:30]).encode()).hexdigest() == published
