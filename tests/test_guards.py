"""Each guard on its own, on real BPO data where the data can say what is right."""

from __future__ import annotations

import json

import pytest

from bpo_plugins.decoding import loop_cut
from bpo_plugins.guards import (
    GuardConfig,
    answered_reason,
    check_rewrite,
    check_text,
    clean_output,
    degenerate_reason,
    lost_terms_reason,
    mask_protected,
)
from bpo_plugins.result import FallbackReason
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def bpo_pairs() -> list[dict]:
    return json.loads(shared_data("bpo", "bpo_val.json").read_text())


def test_optimized_prompts_are_not_taken_for_answers(bpo_pairs):
    flagged = [r for r in bpo_pairs if answered_reason(r["prompt"], r["optimized_prompt"])]
    # BPO's own reference rewrites must pass: at most 1% false alarms.
    assert len(flagged) <= 0.01 * len(bpo_pairs), [r["optimized_prompt"][:80] for r in flagged]


def test_responses_are_detected_as_answers(bpo_pairs):
    answers = [r["good_res"] for r in bpo_pairs] + [r["bad_res"] for r in bpo_pairs]
    prompts = [r["prompt"] for r in bpo_pairs] * 2
    caught = sum(
        answered_reason(p, a) is not None or check_rewrite(p, a) is not None for p, a in zip(prompts, answers)
    )
    assert caught / len(answers) >= 0.85


@pytest.mark.parametrize(
    "output",
    [
        "Sure! Here is a summary of Harry Potter: it is a fantasy series.",
        "Harry Potter is a series of seven fantasy novels written by J. K. Rowling.",
        "I'm sorry, but I can't help with that.",
        "As an AI language model, I think Harry Potter is great.",
    ],
)
def test_answer_shapes(output):
    assert answered_reason("Tell me about Harry Potter", output)


@pytest.mark.parametrize(
    "output",
    [
        "Provide a detailed overview of the Harry Potter series, including its plot and main characters.",
        "Can you tell me about the Harry Potter books, their author and their main themes?",
        "Tell me about Harry Potter: the books, the films and why they became so popular.",
        "Here is the improved prompt: Describe the Harry Potter series in detail.",
    ],
)
def test_rewrite_shapes(output):
    assert answered_reason("Tell me about Harry Potter", clean_output(output)) is None


def test_statement_prompt_may_be_rewritten_as_statement():
    assert answered_reason("The quick brown fox", "The quick brown fox jumps over the lazy dog, continued as a story.") is None


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("", FallbackReason.EMPTY_OUTPUT),
        ("   \n ", FallbackReason.EMPTY_OUTPUT),
        ("Describe it.", FallbackReason.LENGTH_RATIO),  # 2 words for 10: < 0.5x
        (" ".join(["Describe the topic in great detail with examples"] * 9), FallbackReason.DEGENERATE),
        ("Describe " + "it " * 80, FallbackReason.DEGENERATE),
        ("Describe " + "!" * 40, FallbackReason.DEGENERATE),
    ],
)
def test_check_rewrite_reasons(output, reason):
    original = "Explain how the water cycle works in simple terms for kids."
    failure = check_rewrite(original, output)
    assert failure is not None and failure[0] is reason, failure


def test_bpo_reference_rewrites_keep_the_prompts_subject(bpo_pairs):
    flagged = [r for r in bpo_pairs if lost_terms_reason(r["prompt"], r["optimized_prompt"])]
    assert len(flagged) <= 0.01 * len(bpo_pairs), [r["optimized_prompt"][:80] for r in flagged]


@pytest.mark.parametrize(
    ("original", "output"),
    [
        # bpo-small's own slips on held-out pairs: a passage swapped for a generic request, a changed subject
        ("Regarding to that, these should be considered whenever those become relevant to the user's daily decisions.",
         "Please provide a more detailed explanation of the importance of considering these when making decisions."),
        ("Write mumps code to compute the ISO week number from a $H date value.",
         "Write a short Python snippet that prints the current weekday."),
    ],
)
def test_rewrites_that_lose_the_subject_fall_back(original, output):
    failure = check_rewrite(original, output)
    assert failure is not None and failure[0] is FallbackReason.LOST_TERMS, failure
    assert check_rewrite(original, output, GuardConfig(min_term_recall=0)) is None


@pytest.mark.parametrize(
    ("original", "output"),
    [
        ("Tell me a joke", "Tell me a short, clean joke suitable for all ages."),  # too few words to judge
        ("写一首关于秋天的诗", "请写一首描写秋天景色的现代诗，注意意象和韵律。"),  # no spaces: not judged by words
        ("Give two good examples of customer service.", "Give two specific examples of outstanding customer service."),
    ],
)
def test_faithful_or_unjudgeable_rewrites_pass_the_subject_check(original, output):
    assert lost_terms_reason(original, output) is None


def test_length_ratio_upper_bound_uses_bpo_filter():
    original = "Explain photosynthesis."
    ok = "Explain photosynthesis to a high-school student, covering light and dark reactions."  # 12 words: 6x
    too_long = ok + " Include a diagram description and one worked example."
    assert check_rewrite(original, ok) is None
    failure = check_rewrite(original, too_long)
    assert failure is not None and failure[0] is FallbackReason.LENGTH_RATIO


def test_repetitive_prompt_is_not_blamed_on_the_optimizer():
    original = "Repeat after me: la la la la la la la la la la la la la la la la"
    output = "Repeat the phrase exactly as written: la la la la la la la la la la la la la la la la"
    assert degenerate_reason(original, output) is None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Optimized prompt: Describe the sea.", "Describe the sea."),
        ('"Describe the sea."', "Describe the sea."),
        ("Describe the sea. [PROTECT] more", "Describe the sea."),
        ("Describe the sea.<|im_end|>\nassistant", "Describe the sea."),
        ("**Improved prompt:** Describe the sea.", "Describe the sea."),
        ('"Say "hi" to me"', '"Say "hi" to me"'),
    ],
)
def test_clean_output(raw, clean):
    assert clean_output(raw) == clean


def test_protected_spans_round_trip_byte_identical():
    prompt = "Which is right? <keep>A) 2+2=5\nB) 2+2=4  </keep> Answer briefly. Code: `x = {1: 2}`"
    masked = mask_protected(prompt, protect=["`x = {1: 2}`"])
    assert "A) 2+2=5" not in masked.text and "`x = {1: 2}`" not in masked.text
    assert masked.plain == "Which is right? A) 2+2=5\nB) 2+2=4   Answer briefly. Code: `x = {1: 2}`"
    rewritten = masked.text.replace("Which is right?", "Pick the correct equation and justify it:")
    assert masked.restore(rewritten) == (
        "Pick the correct equation and justify it: A) 2+2=5\nB) 2+2=4   Answer briefly. Code: `x = {1: 2}`"
    )


def test_lost_or_invented_placeholders_are_refused():
    masked = mask_protected("Choose: <keep>A or B</keep>")
    assert masked.restore("Choose wisely.") is None
    assert masked.restore("Choose {{KEEP_0}} or {{KEEP_1}}") is None


def test_user_text_with_placeholder_syntax_cannot_collide():
    masked = mask_protected("Template {{KEEP_0}} stays; <keep>this too</keep>")
    assert masked.restore(masked.text) == "Template {{KEEP_0}} stays; this too"


@pytest.mark.parametrize("bad", [b"bytes prompt", 42, None, ["a"], bytearray(b"x")])
def test_check_text_rejects_non_strings(bad):
    with pytest.raises(TypeError, match="must be str"):
        check_text(bad)


# --- loops, stopped while decoding ----------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 4, 20])
def test_loop_cut_keeps_one_copy_of_a_repeating_tail(period):
    head = list(range(1000, 1010))
    unit = list(range(1, period + 1))
    tokens = head + unit * (48 // period + 2)
    assert tokens[: loop_cut(tokens)] == head + unit


def test_loop_cut_leaves_varied_text_short_repeats_and_copies_of_the_prompt():
    assert loop_cut(list(range(300))) is None
    rule = [7, 8] * 6  # a 12-token markdown rule: too short to be a loop
    assert loop_cut(list(range(50)) + rule) is None
    table = [5, 6, 7] * 12  # the prompt's own repetitive data, copied faithfully
    assert loop_cut([1, 2] + table, prompt=[9] + table + [3]) is None
    assert loop_cut([1, 2] + table, prompt=[9, 3]) == 5


# -- meaning kept: payload, numbers, names (issue: rewrites that change the user's meaning) -------------

from bpo_plugins.guards import entities_reason, numbers_lost_reason, payload_lost_reason  # noqa: E402


@pytest.mark.parametrize(("original", "output", "reason"), [
    # The four kinds of meaning change seen in bpo-small's applied rewrites (made-up examples of the same shape).
    ("Fix the verb in this sentence: 'She go to school'", "Fix the sentence to make it grammatically correct.", FallbackReason.PAYLOAD_LOST),
    ("Is 3 bigger than 7? Answer yes or no", "Is 5 bigger than 7? Answer yes or no.", FallbackReason.NUMBERS_LOST),
    ("Translate to French:\nThe cat sleeps on the warm mat.", "Translate a sentence about animals into French.", FallbackReason.PAYLOAD_LOST),
    ("Which is larger?\nA) 2\nB) 4", "Which number is larger? Explain why.", FallbackReason.PAYLOAD_LOST),
    ("Summarize this code: `def add(a, b): return a + b`", "Summarize the code `def add(a, b)` in one line.", FallbackReason.PAYLOAD_LOST),
    ("How many days are in 3 weeks?", "How many days are in a few weeks?", FallbackReason.NUMBERS_LOST),
])
def test_rewrites_that_drop_the_payload_or_numbers_fall_back(original, output, reason):
    failure = check_rewrite(original, output)
    assert failure is not None and failure[0] is reason, failure


@pytest.mark.parametrize(("original", "output", "reason"), [
    ("What is photosynthesis?", "Explain the Smith-Jones theory of photosynthesis proposed by Dr. Alan Wexley.",
     FallbackReason.ENTITIES_INVENTED),
    ("Is it true that the Berlin Wall fell in 1989?", "Is it true that the French Revolution began in 1989?",
     FallbackReason.ENTITIES_LOST),
    ("Who painted the Mona Lisa?", "Who painted the famous portrait, and when?", FallbackReason.ENTITIES_LOST),
])
def test_strict_guards_catch_lost_and_invented_names(original, output, reason):
    failure = check_rewrite(original, output, GuardConfig.strict())
    assert failure is not None and failure[0] is reason, failure
    default = check_rewrite(original, output, GuardConfig())  # names are checked for small optimizers only
    assert default is None or default[0] not in (FallbackReason.ENTITIES_LOST, FallbackReason.ENTITIES_INVENTED)


@pytest.mark.parametrize(("original", "output"), [
    ("Tell me about Harry Potter", "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."),
    ("Fix the verb in this sentence: 'She go to school'", "Correct the verb in the sentence 'She go to school' and explain the rule."),
    ("Is 3 bigger than 7? Answer yes or no", "Is 3 bigger than 7? Answer with yes or no only."),
    ("List three uses of copper.", "List three common uses of copper, with one sentence on each."),
    ("what is the capital of france", "What is the capital of France? Answer in one sentence."),
])
def test_faithful_rewrites_pass_the_strict_guards(original, output):
    assert check_rewrite(original, output, GuardConfig.strict()) is None


def test_bpo_reference_rewrites_keep_their_payload_and_numbers(bpo_pairs):
    # BPO's own reference rewrites: at most 2% flagged by each default meaning guard.
    for guard in (payload_lost_reason, numbers_lost_reason):
        flagged = [r["prompt"][:60] for r in bpo_pairs if guard(r["prompt"], r["optimized_prompt"])]
        assert len(flagged) <= 0.02 * len(bpo_pairs), (guard.__name__, flagged)
    # Names are checked only for small optimizers: strong ones add knowledge (Huxley for Brave New World).
    named = [r for r in bpo_pairs if entities_reason(r["prompt"], r["optimized_prompt"])]
    assert 0.05 < len(named) / len(bpo_pairs) < 0.15


@pytest.mark.parametrize(("raw", "clean"), [
    ('"Tell me about Harry Potter. What is the most interesting fact?', "Tell me about Harry Potter. What is the most interesting fact?"),
    ('Explain "dark matter".”', 'Explain "dark matter".'),
    ("“Describe the sea.", "Describe the sea."),
    ("'Tell me about Harry's wand", "Tell me about Harry's wand"),
    ("'cool' is a word to define", "'cool' is a word to define"),
    ('Say "hi" to me', 'Say "hi" to me'),
])
def test_unmatched_quote_marks_are_cleaned(raw, clean):
    assert clean_output(raw) == clean


def test_intent_guard_falls_back_on_meaning_drift(script_server):
    from bpo_plugins import Rewriter

    rewriter = Rewriter.from_openai("script", base_url=script_server.base_url, guards=GuardConfig(min_intent_cosine=0.9))
    result = rewriter.rewrite("Tell me about Harry Potter")  # the script's rewrite has cosine 0.72 with it
    assert result.fallback is FallbackReason.MEANING_DRIFT and "intent cosine 0.7" in result.detail
    assert Rewriter.from_openai("script", base_url=script_server.base_url).rewrite("Tell me about Harry Potter").fallback is None


def test_bundled_optimizer_gets_the_strict_guards():
    from bpo_plugins import Rewriter

    assert Rewriter.from_pretrained("bpo-small").guards == GuardConfig.strict()
    assert Rewriter.from_pretrained("THUDM/BPO").guards == GuardConfig()  # lazy: nothing is downloaded


# --- English only ----------------------------------------------------------------------------

from bpo_plugins.guards import non_english_reason  # noqa: E402


@pytest.mark.parametrize("prompt", [
    "如何在Facebook上创建个人资料？", "写一首关于秋天的诗", "東京でおすすめのレストランを教えてください", "한국의 수도는 어디입니까?",
    "Как мне научиться программировать на Python?", "ما هي عاصمة فرنسا؟", "Python里怎么读取一个CSV文件？",
    "Comment puis-je améliorer mon CV pour un poste de développeur ?", "Wie kann ich mein Deutsch verbessern, wenn ich keine Zeit habe?",
    "¿Cuál es la mejor manera de aprender a programar?", "Qual é a melhor forma de aprender inglês sozinho?",
    "Come posso migliorare la mia produttività al lavoro?", "Hoe kan ik beter slapen als ik veel stress heb?",
    "Bagaimana cara membuat kue yang enak untuk ulang tahun?", "Làm thế nào để học tiếng Anh hiệu quả?",
])
def test_prompts_mostly_not_in_english_are_detected(prompt):
    assert non_english_reason(prompt)


@pytest.mark.parametrize("prompt", [
    "def foo(x):\n    return x + 1\nWhy does this fail?", "SELECT * FROM users WHERE id = 5;", "12 + 7 * 3 = ?", "2024-01-01", "",
    "Tell me about José García de la Vega", "Who is Xi Jinping?", "Tell me about Москва", "What does je ne sais pas mean?",
    "Translate 'je ne sais pas' into English", "What is the meaning of the Chinese word 你好?",
    "Translate this to English: El perro de mi vecino es muy grande y ladra todas las noches",
    "Translate into English: 我今天很高兴，因为我的朋友来看我了", "Summarize: Le chat est sur la table. Il dort.",
    "Write an email to Mr. Nguyen Van An about the meeting",
])
def test_code_numbers_names_and_english_requests_about_other_languages_are_english(prompt):
    assert non_english_reason(prompt) is None


def test_bpo_data_reads_as_english_but_for_its_one_spanish_prompt(bpo_pairs):
    flagged = [r["prompt"] for r in bpo_pairs if non_english_reason(r["prompt"])]
    assert len(flagged) == 1 and flagged[0].startswith("Crea una cancion")  # BPO's validation data has one
    assert sum(bool(non_english_reason(r["optimized_prompt"])) for r in bpo_pairs) == 1
