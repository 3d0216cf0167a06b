"""``bpo data mix``: one recipe per public source, evaluation prompts kept out, BPO's filters applied.

The fixtures are small files written here in each source's own format; the real files are exported from
their repositories (training/DATA_CARD.md) and never committed.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpo_plugins.inputs import UsageError
from bpo_plugins.training.data import read_pairs
from bpo_plugins.training.selfplay import heldout_split
from bpo_plugins.training.sources import SOURCES, coachlm_triples, mix, style

VICUNA_PROMPT = "How can I improve my time management skills?"  # tests/data/bpo/vicuna_eval.jsonl, question 1


def _rephrase_and_respond(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    rows = [
        {"question": "Was Mark Twain born in an even month?", "answer": "no",
         "refined_question": "Was the writer Mark Twain born in a month with an even number (February, April, June, August, October or December)?"},
        {"question": "You can do knitting to get the feeling of what?", "choices": ["Relaxation", "Arthritis"], "answer": "relaxation",
         "refined_question": "What emotions or sensations might you experience through the process of knitting?"},
        # Near-duplicate of a Vicuna eval prompt (one word changed): MiniLM cosine >= 0.9.
        {"question": "How can I improve my time-management skills?", "answer": "",
         "refined_question": "What practical strategies can I use to improve my time management skills at work and at home?"},
        {"question": "Is the following sentence plausible? Joao Moutinho caught the screen pass.", "answer": "no", "refined_question": ""},
    ]
    (root / "data" / "even_month_gpt-4.json").write_text(json.dumps(rows))
    (root / "data" / "stereo_gpt-4.json").write_text(json.dumps([{"question": "Fill the blank: Girls tend to be more ____ than boys.",
                                                                   "stereo": "soft", "anti_stereo": "determined", "unrelated": "fish",
                                                                   "choices": ["soft"], "refined_question": "Which word fits best?"}]))
    return root


def _coachlm(root: Path) -> Path:
    root.mkdir(parents=True)
    rows = [
        {"Raw Instruction": "Follow the instructions to make nutty chocolate pretzel bites", "Raw Input": "", "Raw Response": "Melt it.",
         "Revised Instruction": "Provide instructions on how to make nutty chocolate pretzel bites", "Revised Input": "",
         "Revised Response": "1. Melt the chocolate. 2. Dip the pretzels. 3. Sprinkle the nuts.", "Distance": 30},
        {"Raw Instruction": "Name three natural elements.", "Raw Input": "", "Raw Response": "Water, air, and fire.",
         "Revised Instruction": "Name three natural elements.", "Revised Input": "",
         "Revised Response": "Oxygen, iron and gold are three natural elements.", "Distance": 12},
    ]
    (root / "Expert Revision Dataset.json").write_text(json.dumps(rows))
    return root


def _oneprompted(root: Path) -> Path:
    (root / "Prompt_Training_V1").mkdir(parents=True)
    (root / "Prompt_Training_V2").mkdir()
    with (root / "Prompt_Training_V1" / "LLM_Generated_Training_Examples.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["task_description", "complexity", "bad_prompt", "good_prompt", "expected_answer",
                                         "prompting_techniques", "prompt_type", "notes"])
        writer.writeheader()
        writer.writerow({"task_description": "pasta", "complexity": "low", "bad_prompt": "Give me a pasta recipe for dinner tonight.",
                         "good_prompt": "Give me a vegetarian pasta recipe for dinner tonight that takes under 30 minutes, with a "
                                        "list of ingredients and numbered steps.", "prompt_type": "INSTRUCTIONAL"})
        writer.writerow({"task_description": "story", "complexity": "high", "bad_prompt": "Tell me a story.",
                         "good_prompt": "Imagine you are a science fiction author. " + "Describe the world in vivid detail. " * 12,
                         "prompt_type": "CREATIVE_WRITING"})
    with (root / "Prompt_Training_V2" / "labeled_train_final.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["original_prompt", "context", "instruction", "improved_instruction"])
        writer.writeheader()
        writer.writerow({"original_prompt": "Write a short poem about autumn leaves", "context": "", "instruction": "Write a short poem about autumn leaves",
                         "improved_instruction": "Write a detailed, long poem about autumn leaves with vivid imagery and a rhyme scheme."})
        writer.writerow({"original_prompt": "Summarize this: The meeting moved to Friday.", "context": "The meeting moved to Friday.",
                         "instruction": "Summarize this:", "improved_instruction": "Summarize the following text in one sentence."})
    return root


@pytest.fixture(scope="module")
def embedder():
    from bpo_plugins.embeddings import Embedder

    return Embedder()


def test_each_recipe_reads_its_sources_format(tmp_path: Path):
    rar = list(SOURCES["rephrase-and-respond"].read(_rephrase_and_respond(tmp_path / "rar")))
    assert [r for _, r in rar].count("stereoset_cc_by_sa") == 1 and [r for _, r in rar].count("no_rewrite") == 1
    assert {p.source for p, _ in rar if p} == {"rephrase-and-respond:even_month_gpt-4"}

    coach = list(SOURCES["coachlm"].read(_coachlm(tmp_path / "coach")))
    pairs = [p for p, _ in coach if p]
    assert [r for _, r in coach if r] == ["instruction_not_revised"]
    assert pairs[0].optimized.startswith("Provide instructions") and pairs[0].good_res.startswith("1. Melt") and pairs[0].bad_res == "Melt it."
    triples = coachlm_triples(tmp_path / "coach")
    assert len(triples) == 2 and triples[1].chosen.startswith("Oxygen")

    one = list(SOURCES["oneprompted"].read(_oneprompted(tmp_path / "one")))
    assert [r for _, r in one if r] == ["has_context"]
    assert {p.source for p, _ in one if p} == {"oneprompted:v1", "oneprompted:v2"}


def test_mix_keeps_eval_and_heldout_prompts_out_and_applies_bpos_filters(tmp_path: Path, embedder):
    sources = {"bpo": Path("tests/data/bpo/bpo_val.json"), "rephrase-and-respond": _rephrase_and_respond(tmp_path / "rar"),
               "oneprompted": _oneprompted(tmp_path / "one")}
    report = mix(sources, tmp_path / "mix", heldout_from="tests/data/bpo/bpo_val.json", embedder=embedder)

    bpo = report["sources"]["bpo"]
    assert bpo["dropped"]["heldout_exact"] == 60  # the fixed decision split (training/results/selfplay/)
    assert len(read_pairs([tmp_path / "mix" / "heldout.jsonl"])) == 60
    rar = report["sources"]["rephrase-and-respond"]
    assert rar["dropped"]["eval_near"] == 1 and rar["kept"] == 2
    one = report["sources"]["oneprompted"]
    # BPO's word-ratio filter (the story grows 40x), the constraint check ("short" -> "detailed, long"), the context row.
    assert one["dropped"] == {"length_ratio": 1, "constraint_lost": 1, "has_context": 1} and one["kept"] == 1
    kept = [json.loads(line) for line in (tmp_path / "mix" / "pairs.jsonl").read_text().splitlines()]
    assert len(kept) == report["kept"] == sum(s["kept"] for s in report["sources"].values())
    assert VICUNA_PROMPT.lower() not in {k["prompt"].lower() for k in kept}
    # Every arm of the ablation is readable by bpo train as it is.
    assert len(read_pairs([tmp_path / "mix" / "sources" / "rephrase-and-respond.jsonl"])) == 2
    assert report["shippable"] and "Apache-2.0" in bpo["licence"]


def test_a_source_we_may_not_ship_is_refused_unless_asked_for(tmp_path: Path, embedder):
    coach = _coachlm(tmp_path / "coach")
    with pytest.raises(UsageError, match="CC BY-NC"):
        mix({"coachlm": coach}, tmp_path / "mix")
    rows = json.loads((coach / "Expert Revision Dataset.json").read_text())
    # Near copies of a Vicuna eval prompt (one word changed, cosine >= 0.9) and of a BPO held-out prompt (exact): never
    # a training prompt, as a rewrite pair or as a preference triple.
    held_prompt = heldout_split("tests/data/bpo/bpo_val.json")[1][0].prompt
    rows += [{**rows[1], "Raw Instruction": "How can I improve my time-management skills?", "Revised Instruction": "How can I improve my time-management skills?"},
             {**rows[1], "Raw Instruction": held_prompt, "Revised Instruction": held_prompt}]
    (coach / "Expert Revision Dataset.json").write_text(json.dumps(rows))
    report = mix({"coachlm": coach}, tmp_path / "mix", allow_noncommercial=True, heldout_from="tests/data/bpo/bpo_val.json", embedder=embedder)
    coachlm = report["sources"]["coachlm"]
    assert not report["shippable"] and coachlm["preference_triples"] == 2
    assert coachlm["preference_dropped"] == {"eval_near": 1, "heldout_exact": 1}
    written = [json.loads(line) for line in (tmp_path / "mix" / "coachlm.triples.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in written] == [r["Raw Instruction"] for r in rows[:2]]


def test_style_figures():
    from bpo_plugins.training.data import Pair

    figures = style([Pair("Tell me about X", "Tell me about X"), Pair("Tell me about X", "Tell me about X. Include its history."),
                     Pair("Explain Y", "Describe Y in simple terms for a beginner.")])
    assert figures["unchanged"] == pytest.approx(1 / 3, abs=1e-3) and figures["only_adds"] == pytest.approx(1 / 3, abs=1e-3)
    assert figures["length_ratio"]["median"] == 1.75


def test_the_command_line_names_a_bad_source_in_one_line(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "bpo_plugins", "data", "mix", "--source", "alpacaeval=x.json", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "unknown source alpacaeval" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_complement_keeps_the_prompt_and_appends_only_what_the_rewrite_adds():
    from bpo_plugins.training.complement import additions, complement
    from bpo_plugins.training.data import Pair

    prompt = "Name one disadvantage of online shopping"
    # The restating sentence shares most of its content words with the prompt; the two after it are new.
    optimized = ("Name one disadvantage of online shopping in detail. Explain how fraud and scams affect buyers. "
                 "Give a real example.")
    assert additions(prompt, optimized) == "Explain how fraud and scams affect buyers. Give a real example."
    pair = complement(Pair(prompt, optimized, "good", "bad", source="bpo"))
    # A period closes the user's sentence before the addition; everything else of the pair stays.
    assert pair.optimized == prompt + ". Explain how fraud and scams affect buyers. Give a real example."
    assert (pair.prompt, pair.good_res, pair.bad_res, pair.source) == (prompt, "good", "bad", "bpo")
    assert complement(Pair("What is hard water?", "What is hard water? Explain its effect on kettles.")).optimized \
        == "What is hard water? Explain its effect on kettles."
    # A rewrite with no new sentence gives the prompt alone, without its trailing space.
    assert complement(Pair("Draft a screenplay for a comedic short film.  ", "Draft a comedic short film screenplay.")).optimized \
        == "Draft a screenplay for a comedic short film."
    # Exactly half of a sentence's content words in the prompt is a restatement; less is new.
    assert additions("Describe oceans", "Describe deserts.") == "" and additions("Describe oceans", "Compare deserts.") == "Compare deserts."


def test_complement_keeps_lines_apart_and_leaves_unspaced_scripts_alone():
    from bpo_plugins.training.complement import additions, complement
    from bpo_plugins.training.data import Pair

    # The prompt's data line stays on its own; the addition follows a blank line.
    assert complement(Pair("Summarize this\nThe cat sat on the mat", "Summarize the sentence. Keep it under twenty words.")).optimized \
        == "Summarize this\nThe cat sat on the mat\n\nKeep it under twenty words."
    # A list's lines stay lines (their numbers, split off as sentences without content words, go).
    assert additions("Write a poem about autumn.", "Write a poem about autumn.\nRequirements:\n1. Use vivid imagery.\n2. Include four stanzas.") \
        == "Requirements:\nUse vivid imagery.\nInclude four stanzas."
    # Chinese has no spaces between words: no word sets to compare, so nothing is added.
    assert complement(Pair("写一首关于秋天的诗。", "写一首关于秋天的诗。要求押韵。")).optimized == "写一首关于秋天的诗。"


def test_mix_with_complement_targets_keeps_the_prompts_verbatim_and_drops_rewrites_that_add_nothing(tmp_path: Path, embedder):
    sources = {"bpo": Path("tests/data/bpo/bpo_val.json")}
    plain = mix(sources, tmp_path / "plain", heldout_from="tests/data/bpo/bpo_val.json", embedder=embedder)
    report = mix(sources, tmp_path / "complement", heldout_from="tests/data/bpo/bpo_val.json", embedder=embedder, as_complement=True)
    dropped = report["sources"]["bpo"]["dropped"]
    # The same filters on the source's own rewrites; then the rewrites that add no new sentence go.
    assert {k: v for k, v in dropped.items() if k != "complement_adds_nothing"} == plain["sources"]["bpo"]["dropped"]
    assert report["kept"] + dropped["complement_adds_nothing"] == plain["kept"] and report["kept"] > 0
    pairs = read_pairs([tmp_path / "complement" / "pairs.jsonl"])
    plain_prompts = [p.prompt for p in read_pairs([tmp_path / "plain" / "pairs.jsonl"])]
    assert [p.prompt for p in pairs] == [p for p in plain_prompts if p in {q.prompt for q in pairs}]
    assert all(p.optimized.startswith(p.prompt.rstrip()) and len(p.optimized) > len(p.prompt.rstrip()) + 2 for p in pairs)
    assert report["sources"]["bpo"]["style_kept"]["only_adds"] == 1.0
    assert "targets: the untouched prompt plus what the rewrite adds" in (tmp_path / "complement" / "report.md").read_text()
