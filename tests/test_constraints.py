"""The user's explicit constraints (bpo_plugins/constraints.py) and the ``constraint_lost`` guard."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest

from bpo_plugins.constraints import constraint_reason, extract_constraints, violations
from bpo_plugins.guards import GuardConfig, check_rewrite
from bpo_plugins.result import FallbackReason
from tests.conftest import shared_data

_NUMBERS_OFF = GuardConfig(check_numbers=False)
WATER_BOTTLE = "Write a short product description for a reusable water bottle"
# What examples/langchain_agent.py got back from bpo-small (issue 30 §3).
WATER_BOTTLE_REWRITE = ("Write a detailed product description for a reusable water bottle, including the features and benefits "
                        "of the product, including the materials used, the design, and the warranty offered")


@pytest.mark.parametrize(("prompt", "expected"), [
    (WATER_BOTTLE, {("length", "short")}),
    ("Briefly explain how vaccines work.", {("length", "short")}),
    ("Explain the causes of World War I in detail.", {("length", "long")}),
    ("Don't make it too detailed: describe the water cycle.", {("length", "short")}),
    ("Summarize this article in 50 words.", {("length", "50 word")}),
    ("Describe a hobby in 15 words or less.", {("length", "15 word")}),
    ("Summarize the given article in 1-2 sentences.", {("length", "1-2 sentence")}),
    ("Explain recursion in one sentence.", {("length", "1 sentence")}),
    ("Please summarise the book in two paragraphs.", {("length", "2 paragraph")}),
    ("Give me three tips for better sleep.", {("count", "3 tips")}),
    ("Generate 3 potential domains for a travel website", {("count", "3 domains")}),
    ("What are the top 5 programming languages in 2024?", {("count", "5 top")}),
    ("Return the list of users as JSON.", {("format", "JSON")}),
    ("Create a table comparing cats and dogs.", {("format", "table")}),
    ("Give the main points as bullet points.", {("format", "list")}),
    ("Write a bash one-liner to count files. Only give the code, no explanation.", {("length", "short"), ("format", "code only"),
                                                                                    ("language", "bash")}),
    ("Is 17 a prime number? Answer yes or no.", {("format", "yes or no")}),
    ("Explain black holes to a 10-year-old.", {("audience", "child")}),
    ("Explain dialectical materialism in simple terms", {("audience", "non-expert")}),
    ("Write an introduction to Kubernetes for beginners.", {("audience", "non-expert")}),
    ("Translate 'good morning' into Spanish.", {("language", "spanish")}),
    ("Write a function in Python that reverses a string.", {("language", "python")}),
])
def test_constraints_are_found(prompt, expected):
    assert {(c.kind, c.value) for c in extract_constraints(prompt)} == expected


@pytest.mark.parametrize("prompt", [
    "Tell me about Harry Potter",
    "Draft a screenplay for a comedic short film.",  # a genre, not a length
    "If Anny is 180cm and Lucas is 4cm shorter than Carlos, how tall is Lucas?",
    "Find any two characters in the story who behave the same way.",  # people, not a length
    "In short, what is the difference between TCP and UDP?",
    "What is a short-term loan?",
    "Where is the periodic table kept in the lab?",
    "What happened in 1969?",
])
def test_no_constraint_is_invented(prompt):
    assert extract_constraints(prompt) == []


@pytest.mark.parametrize(("prompt", "rewrite", "verdict"), [
    (WATER_BOTTLE, WATER_BOTTLE_REWRITE, "inverted"),
    (WATER_BOTTLE, "Write a product description for a reusable water bottle that highlights its eco-friendly design.", "lost"),
    ("Briefly explain how vaccines work.", "Explain in depth how vaccines work, covering the immune response.", "inverted"),
    ("Explain the causes of World War I in detail.", "Give a concise summary of the causes of World War I.", "inverted"),
    ("Summarize this article in 50 words.", "Summarize this article in about 200 words.", "inverted"),
    ("Summarize this article in 50 words.", "Summarize the main points of this article.", "lost"),
    ("Explain recursion in one sentence.", "Explain recursion with examples in three paragraphs.", "lost"),
    ("Give me three tips for better sleep.", "Provide five tips for better sleep.", "inverted"),
    ("Give me three tips for better sleep.", "Give me some practical tips for better sleep.", "lost"),
    ("Return the list of users as JSON.", "Return the list of users in a readable format.", "lost"),
    ("Create a table comparing cats and dogs.", "Compare cats and dogs, covering size, diet and temperament.", "lost"),
    ("Write a bash script to count files. Only give the code.", "Write a bash script to count files and explain how it works.", "lost"),
    ("Is 17 a prime number? Answer yes or no.", "Is 17 a prime number? Explain your reasoning.", "lost"),
    ("Explain black holes to a 10-year-old.", "Explain black holes for physics experts, with the relevant equations.", "inverted"),
    ("Write an introduction to Kubernetes for beginners.", "Write an introduction to Kubernetes.", "lost"),
    ("Translate 'good morning' into Spanish.", "Translate 'good morning' into French.", "inverted"),
    ("Write a function in Python that reverses a string.", "Write a function in JavaScript that reverses a string.", "inverted"),
])
def test_rewrites_that_drop_or_contradict_a_constraint_are_caught(prompt, rewrite, verdict):
    found = violations(prompt, rewrite)
    assert found and found[0].verdict == verdict, found
    # The numbers guard runs first and catches some of these itself; this one catches them all.
    assert check_rewrite(prompt, rewrite, _NUMBERS_OFF)[0] is FallbackReason.CONSTRAINT_LOST


@pytest.mark.parametrize(("prompt", "rewrite"), [
    (WATER_BOTTLE, "Write a short, engaging product description for a reusable water bottle, mentioning its materials."),
    (WATER_BOTTLE, "Write a concise product description for a reusable water bottle that highlights durability."),
    ("Briefly explain how vaccines work.", "In two or three sentences, explain how vaccines train the immune system."),
    ("Explain the causes of World War I in detail.", "Explain the causes of World War I, including details about alliances."),
    ("Summarize the given article in 1-2 sentences.", "Summarize the article's main finding in 2 sentences."),
    ("Explain recursion in one sentence.", "Explain recursion in a single, clear sentence."),
    ("Give me three tips for better sleep.", "Give me 3 practical, evidence-based tips for better sleep."),
    ("Return the list of users as JSON.", "Return the list of users as a JSON array with name and email fields."),
    ("Give the main points as bullet points.", "List the main points as a bulleted list, one line each."),
    ("Write a bash script to count files. Only give the code.", "Write a bash script that counts the files in a folder. Only give the code."),
    ("Is 17 a prime number? Answer yes or no.", 'Is 17 a prime number? Answer "yes" or "no".'),
    ("Explain black holes to a 10-year-old.", "Explain black holes to a child, using simple comparisons from everyday life."),
    ("Translate 'good morning' into Spanish.", "Translate the phrase 'good morning' into Spanish, with its pronunciation."),
    ("Tell me about Harry Potter", "Provide a detailed overview of the Harry Potter series."),  # adding a requirement is fine
    ("What is the capital of France?", "What is the capital of France? Answer in one sentence."),
])
def test_rewrites_that_keep_or_add_constraints_pass(prompt, rewrite):
    assert violations(prompt, rewrite) == []
    assert check_rewrite(prompt, rewrite, _NUMBERS_OFF) is None


def test_bpo_reference_rewrites_rarely_trip_the_constraint_guard():
    # BPO's own reference rewrites are the false-positive check: its 300 validation pairs trip it twice,
    # each a reference that does drop what the user said ("a short essay" -> "a detailed essay").
    pairs = json.loads(shared_data("bpo", "bpo_val.json").read_text())
    flagged = [(r["prompt"][:60], constraint_reason(r["prompt"], r["optimized_prompt"])) for r in pairs
               if constraint_reason(r["prompt"], r["optimized_prompt"])]
    assert len(flagged) <= 0.015 * len(pairs), flagged
    assert sum(bool(extract_constraints(r["prompt"])) for r in pairs) >= 40  # it is judging something


def test_the_switch_turns_it_off():
    off = dataclasses.replace(GuardConfig(), check_constraints=False)
    assert check_rewrite(WATER_BOTTLE, WATER_BOTTLE_REWRITE, off) is None
    assert GuardConfig().check_constraints and GuardConfig.strict().check_constraints


@pytest.fixture(scope="module")
def bottle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.support.processes import scripted_server

    yield from scripted_server(tmp_path_factory.mktemp("bottle"), {"reusable water bottle": WATER_BOTTLE_REWRITE})


def test_rewriter_falls_back_to_the_prompt_when_a_constraint_is_inverted(bottle_server):
    from bpo_plugins import Rewriter

    result = Rewriter.from_openai("script", base_url=bottle_server.base_url).rewrite(WATER_BOTTLE)
    assert result.fallback is FallbackReason.CONSTRAINT_LOST
    assert result.rewritten == WATER_BOTTLE
    assert "'short'" in result.detail and "'detailed'" in result.detail
    off = Rewriter.from_openai("script", base_url=bottle_server.base_url,
                               guards=dataclasses.replace(GuardConfig(), check_constraints=False)).rewrite(WATER_BOTTLE)
    assert off.fallback is None and off.rewritten == WATER_BOTTLE_REWRITE
