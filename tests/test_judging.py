"""Candidate judging on plain strings, with no Rewriter and no model: what passes the guards, which
failure is reported, and which candidate is chosen."""

from __future__ import annotations

from bpo_plugins.guards import GuardConfig, mask_protected
from bpo_plugins.judging import checked_inputs, judge_candidates, pass_through_reason
from bpo_plugins.result import FallbackReason
from bpo_plugins.selectors import SELECTORS

PROMPT = "Explain how photosynthesis turns sunlight into chemical energy in plants."
GOOD = "Explain in detail how photosynthesis in plants turns sunlight into chemical energy, step by step."


def test_a_passing_candidate_is_chosen_cleaned_and_the_first_failure_is_kept_otherwise():
    masked = mask_protected(PROMPT)
    verdict = judge_candidates(masked, ["", f'Improved prompt: "{GOOD}"'], GuardConfig(), SELECTORS["first"])
    assert verdict.chosen == GOOD and verdict.failure is None
    assert verdict.candidates == ("", GOOD)  # labels and quotes cleaned off every candidate
    failed = judge_candidates(masked, ["", "ok"], GuardConfig(), SELECTORS["first"])
    assert failed.chosen is None and failed.failure is not None and failed.failure[0] == FallbackReason.EMPTY_OUTPUT


def test_protected_spans_are_restored_and_a_lost_placeholder_fails():
    masked = mask_protected("Summarise <keep>the attached report</keep> for a manager in three sentences.")
    placeholder = masked.text.split("Summarise ")[1].split(" for")[0]
    kept = judge_candidates(masked, [f"Write a three-sentence summary of {placeholder} for a manager, in plain words."],
                            GuardConfig(), SELECTORS["first"])
    assert kept.chosen == "Write a three-sentence summary of the attached report for a manager, in plain words."
    lost = judge_candidates(masked, ["Write a three-sentence summary of the report for a manager, in plain words."],
                            GuardConfig(), SELECTORS["first"])
    assert lost.chosen is None and lost.failure[0] == FallbackReason.PROTECTED_SPAN_LOST


def test_inputs_that_pass_through_without_a_generation():
    assert pass_through_reason(mask_protected("   "), 512, True)[0] == FallbackReason.EMPTY_INPUT
    assert pass_through_reason(mask_protected("word " * 20), 10, True)[0] == FallbackReason.INPUT_TOO_LONG
    assert pass_through_reason(mask_protected(PROMPT), 512, True) is None
    prompts, contexts = checked_inputs([PROMPT], [None], ())
    assert prompts == [PROMPT] and contexts == [None]
