"""Pure checks that decide whether an optimizer's output may replace the user's prompt.

Every function here is free of model and framework code, so each guard is unit-tested on
its own and every backend (transformers, ONNX Runtime, HTTP) gets the same protection.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bpo_plugins.result import FallbackReason

__all__ = [
    "BANNED_MARKERS", "CUT_MARKERS", "GENERIC_NAMES", "KEEP_TAG", "MAX_LENGTH_RATIO", "MIN_LENGTH_RATIO", "MIN_TERM_RECALL",
    "NON_ENGLISH_SHARE", "PAYLOAD_RECALL", "STRICT_INTENT_COSINE", "GuardConfig", "Masked", "answered_reason",
    "check_rewrite", "check_text", "clean_output", "content_terms", "degenerate_reason", "entities_reason", "has_marker",
    "length_ratio_reason", "placeholder_pattern",
    "lost_terms_reason", "mask_protected", "names", "non_english_reason", "numbers_lost_reason",
    "payload_lost_reason", "payload_segments", "repetition_score", "word_count",
]

# BPO's aggressive mode bans these marker words and cuts outputs at their prefixes
# (thu-coai/BPO src/infer_example.py); the chat-format tokens leak from small models.
BANNED_MARKERS: tuple[str, ...] = ("[PROTECT]", "\n\n[PROTECT]", "[KEEP", "[INSTRUCTION]")
#: Where an output is cut at runtime, and what drops a teacher's rewrite from the training data
#: (:func:`has_marker`): one list, so what training keeps out is what serving cuts off.
CUT_MARKERS: tuple[str, ...] = ("[KE", "[INS", "[PRO", "[/INST", "</s>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "[END]")

# BPO's data filter: a pair is dropped when orig/opt > 2 or opt/orig > 6 (in words).
MIN_LENGTH_RATIO = 0.5
MAX_LENGTH_RATIO = 6.0

# A rewrite must keep this share of the prompt's content words (see lost_terms_reason). Set from BPO's
# own data: 1% of the 300 reference rewrites in bpo_val.json keep less (3.7% would at 0.4).
MIN_TERM_RECALL = 0.3

# The intent bar of GuardConfig.strict(): see its calibration in benchmarks/RESULTS.md ("Do no harm").
STRICT_INTENT_COSINE = 0.8

KEEP_TAG = re.compile(r"<keep>(.*?)</keep>", re.DOTALL)


def check_text(value: object, name: str = "prompt") -> str:
    """Reject what is not text with an error that says what to pass instead."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be str, not {type(value).__name__}: decode it first, e.g. data.decode('utf-8')")
    raise TypeError(f"{name} must be str, not {type(value).__name__}")


def word_count(text: str) -> int:
    return len(text.split())


def has_marker(text: str) -> bool:
    """True when ``text`` holds a marker (:data:`CUT_MARKERS`, in any case) that runtime would cut at."""
    lowered = text.lower()
    return any(marker.lower() in lowered for marker in CUT_MARKERS)


def length_ratio_reason(original: str, output: str, low: float = MIN_LENGTH_RATIO, high: float = MAX_LENGTH_RATIO) -> str | None:
    """BPO's length filter, at runtime and on training pairs: the rewrite's length in words over the
    prompt's must lie in [low, high]."""
    ratio = word_count(output) / max(word_count(original), 1)
    if low <= ratio <= high:
        return None
    return f"rewrite is {ratio:.2f}x the prompt in words (allowed {low}-{high}x)"


def placeholder_pattern(tag: str) -> re.Pattern[str]:
    """A protected span's placeholder, ``{{TAG_n}}``; group 1 is n."""
    return re.compile(r"\{\{" + tag + r"_(\d+)\}\}")


def _placeholder(tag: str, n: int | str) -> str:
    return f"{{{{{tag}_{n}}}}}"


# --- protected spans -------------------------------------------------------------------------


@dataclass(frozen=True)
class Masked:
    """A prompt with its protected spans swapped for placeholders the optimizer must copy."""

    text: str  # what the optimizer sees
    plain: str  # the prompt with <keep> tags removed: what a fallback passes on
    spans: tuple[str, ...]
    tag: str = "KEEP"

    @property
    def without_placeholders(self) -> str:
        """What the optimizer sees, each placeholder a space (for checks that read the prompt's words)."""
        return placeholder_pattern(self.tag).sub(" ", self.text)

    def restore(self, output: str) -> str | None:
        """Put the spans back byte-identical; None when the optimizer lost or invented a placeholder."""
        if not self.spans:
            return output
        pattern = placeholder_pattern(self.tag)
        seen = {int(m) for m in pattern.findall(output)}
        if seen != set(range(len(self.spans))):
            return None
        return pattern.sub(lambda m: self.spans[int(m.group(1))], output)


def mask_protected(prompt: str, protect: Sequence[str] = ()) -> Masked:
    """Replace ``<keep>…</keep>`` spans and each string in ``protect`` with placeholders."""
    spans: list[str] = []
    tag = "KEEP"
    while "{{" + tag in prompt or any("{{" + tag in span for span in protect if isinstance(span, str)):
        tag += "X"  # the user's own text holds our placeholder syntax: pick one it cannot contain

    def placeholder(span: str) -> str:
        spans.append(span)
        return _placeholder(tag, len(spans) - 1)

    plain = KEEP_TAG.sub(lambda m: m.group(1), prompt)
    text = KEEP_TAG.sub(lambda m: placeholder(m.group(1)), prompt)
    for span in protect:
        check_text(span, "protected span")
        if not span:
            continue
        # Replace only outside placeholders already made, so a span like "0" cannot break one.
        pieces = placeholder_pattern(tag).split(text)  # text, n, text, n, ..., text
        if any(span in piece for piece in pieces[::2]):
            marker = placeholder(span)
            pieces[::2] = [piece.replace(span, marker) for piece in pieces[::2]]
            pieces[1::2] = [_placeholder(tag, n) for n in pieces[1::2]]
            text = "".join(pieces)
    return Masked(text=text, plain=plain, spans=tuple(spans), tag=tag)


# --- output clean-up -------------------------------------------------------------------------

_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:here(?:'s| is) (?:the |an |my )?)?(?:improved|optimi[sz]ed|rewritten|revised|refined|enhanced|better|new)"
    r"\s+(?:prompt|instruction|version|query)(?: is)?(?:\*\*)?\s*[:：]\s*(?:\*\*)?",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "«": "»", "`": "`"}


def clean_output(text: str) -> str:
    """Strip what optimizers wrap around a rewrite: labels, quotes, chat markers, BPO markers."""
    cut = len(text)
    for marker in CUT_MARKERS:
        at = text.find(marker)
        if at != -1:
            cut = min(cut, at)
    text = text[:cut].strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]):
        inner = text[1:-1].strip()
        if _QUOTES[text[0]] not in inner:
            text = inner
    return _strip_unmatched_quote(text)


def _strip_unmatched_quote(text: str) -> str:
    """A quote mark that opens or closes the whole rewrite with no partner (small models write
    ``"Tell me about X. What is...``): dropped. Apostrophes inside words are not quote marks."""
    for open_, close in (('"', '"'), ("“", "”"), ("«", "»")):
        if open_ == close:
            if text.count(open_) % 2 == 1:  # an odd count: one straight quote has no partner
                if text.startswith(open_):
                    text = text[1:].lstrip()
                elif text.endswith(open_):
                    text = text[:-1].rstrip()
            continue
        if text.startswith(open_) and close not in text:
            text = text[1:].lstrip()
        if text.endswith(close) and open_ not in text:
            text = text[:-1].rstrip()
    if text.startswith("'") and not re.search(r"\w'(?!\w)", text[1:]):  # no quote closes after a word
        text = text[1:].lstrip()
    return text


# --- degenerate output -----------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def repetition_score(text: str) -> float:
    """Share of repeated word 3-grams: 0 for varied text, near 1 for a loop."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 12:
        return 0.0
    grams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(grams)) / len(grams)


def degenerate_reason(original: str, output: str) -> str | None:
    """Why an output is a loop or noise rather than a prompt, or None."""
    if re.search(r"(.)\1{29,}", output) and not re.search(r"(.)\1{29,}", original):
        return "a character repeated 30+ times"
    score = repetition_score(output)
    # Small models (<2B) loop (thu-coai/BPO#16); a user's own repetitive prompt is not our doing.
    if score > 0.5 and score > repetition_score(original) + 0.2:
        return f"{score:.0%} of word 3-grams repeat"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if len(lines) >= 3:
        line, count = Counter(lines).most_common(1)[0]
        if count >= 3 and count / len(lines) > 0.3 and original.count(line) < count:
            return f"a line repeated {count} times"
    if output and sum(c.isalnum() for c in output) / len(output) < 0.25 <= (
        sum(c.isalnum() for c in original) / max(len(original), 1)
    ):
        return "mostly punctuation or symbols"
    return None


# --- lost the prompt's subject --------------------------------------------------------------

_STOPWORDS = frozenset(
    """the and but for with from into onto over under about above below this that these those its
    are was were been being have has had does did done can could would should will shall may might must
    not nor yes you your yours our ours their theirs his her hers him she they them what which who whom
    whose how why when where there here than then also any some all each every more most other such only
    own same too very just please one two let get got make made want need like know""".split()
)


_UNSPACED_SCRIPT = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_terms(text: str) -> set[str]:
    """Lower-cased, crudely stemmed words of 3+ letters that are not function words."""
    return {_stem(w) for w in (m.lower() for m in re.findall(r"[^\W_]+", text)) if len(w) > 2 and w not in _STOPWORDS}


def lost_terms_reason(original: str, output: str, min_recall: float = MIN_TERM_RECALL) -> str | None:
    """Why a rewrite no longer asks about what the user asked about, or None.

    Small optimizers sometimes swap the subject ("mumps code" becomes "Python code") or replace a
    passage with a generic request. Both show as content words of the prompt missing from the rewrite.
    """
    if _UNSPACED_SCRIPT.search(original):
        return None  # Chinese, Japanese, Korean: no spaces between words, so no word sets to compare
    terms = content_terms(original)
    if len(terms) < 3:
        return None  # too few words to judge by
    kept = terms & content_terms(output)
    if len(kept) / len(terms) < min_recall:
        return f"the rewrite keeps {len(kept)} of the prompt's {len(terms)} content words (needs {min_recall:.0%})"
    return None


# --- kept what the instruction works on, its numbers and its names -----------------------------

_QUOTED = re.compile(r'"([^"\n]{3,})"|“([^”]{3,})”|«([^»]{3,})»|(?<![\w])\'([^\'\n]{3,})\'(?![\w])|```(.+?)```|`([^`\n]{2,})`', re.DOTALL)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)]|[A-Ha-h][.)])\s+(.+)$", re.MULTILINE)
_OPTION = re.compile(r"(?:^|\s)\(?[A-Ha-h]\)\s*([^()\n]+?)(?=\s+\(?[A-Ha-h]\)|$)", re.MULTILINE)
#: A segment counts as kept when this share of its words is in the rewrite (a typo fixed, a quote restyled).
PAYLOAD_RECALL = 0.8


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def payload_segments(prompt: str) -> list[str]:
    """What an instruction works on, which a rewrite must carry over: quoted text, code, list items,
    answer options, and the data after an instruction line ("Fix the verb in this sentence: ...")."""
    segments = [next(g for g in m.groups() if g) for m in _QUOTED.finditer(prompt)]
    segments += [m.group(1) for m in _LIST_ITEM.finditer(prompt)]
    segments += [m.group(1) for m in _OPTION.finditer(prompt)]
    head, sep, data = prompt.partition(":")
    if not sep or "\n" in head.strip() or word_count(head) > 25 or "//" in data[:2]:
        head, sep, data = prompt.strip().partition("\n")
    if sep and word_count(data) >= 2 and _is_request(head):
        segments.append(data)
    return [s.strip() for s in segments if len(_words(s)) >= 1 and len(s.strip()) >= 3]


def payload_lost_reason(original: str, output: str, recall: float = PAYLOAD_RECALL) -> str | None:
    """Why a rewrite dropped the text the prompt's instruction works on, or None."""
    kept = Counter(_words(output))
    for segment in payload_segments(original):
        words = _words(segment)
        found = sum(min(n, kept[w]) for w, n in Counter(words).items())
        if found / len(words) < recall:
            return f"the rewrite drops {segment[:60]!r}{'...' if len(segment) > 60 else ''} ({found} of {len(words)} words kept)"
    return None


_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:/]\d+)*(?![\w])")
# "one" is left out: far more often a pronoun ("program one to") than a count.
_NUMBER_WORDS = {w: str(n) for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split()) if w != "one"}


def _numbers(text: str) -> set[str]:
    found = {n.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", n) else n for n in _NUMBER.findall(text)}
    return found | {_NUMBER_WORDS[w] for w in _words(text) if w in _NUMBER_WORDS}


def numbers_lost_reason(original: str, output: str) -> str | None:
    """Why a rewrite lost one of the prompt's numbers ("Is 3 bigger than 7?" asked about 5), or None."""
    lost = sorted(_numbers(original) - _numbers(output))
    if lost:
        return f"the rewrite drops the number{'s' if len(lost) > 1 else ''} {', '.join(lost[:5])}"
    return None


_CAPITALISED = re.compile(r"\b[A-Z][\w’'-]*(?!\w)")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]|[.!?:;]['\"”’)\]]|^['\"“‘(\[])\s*$")
#: Capitalised words that name no particular thing: a rewrite may add these freely.
GENERIC_NAMES = frozenset(
    """i i'm i've i'd i'll ai english markdown json csv html sql api url faq pdf tl;dr ok""".split()
)


def names(text: str) -> set[str]:
    """Lower-cased capitalised words that do not open a sentence: a crude, model-free stand-in for
    named entities (people, places, products, acronyms)."""
    found = set()
    for match in _CAPITALISED.finditer(text):
        word = re.sub(r"['’]s$", "", match.group(0)).strip("'’-")
        if len(word) < 2 or _SENTENCE_START.search(text[max(0, match.start() - 3) : match.start()]):
            continue
        if text[match.end() : match.end() + 1] == ":":  # a heading the rewrite adds ("Tone:"), not a name
            continue
        if word.lower() not in GENERIC_NAMES and word.lower() not in _STOPWORDS:
            found.add(_stem(word.lower()))
    return found


def entities_reason(original: str, output: str) -> tuple[FallbackReason, str] | None:
    """A name of the prompt missing from the rewrite, or names the rewrite invents; None when neither."""
    said = {_stem(w) for w in _words(original)}
    kept = {_stem(w) for w in _words(output)}
    lost = sorted(n for n in names(original) if not set(_words(n)) <= kept)
    if lost:
        return FallbackReason.ENTITIES_LOST, f"the rewrite drops {', '.join(lost[:5])}"
    invented = sorted(n for n in names(output) if not set(_words(n)) <= said)
    if invented:
        return FallbackReason.ENTITIES_INVENTED, f"the rewrite names {', '.join(invented[:5])}, which the prompt does not"
    return None


# --- answered instead of rewrote -------------------------------------------------------------

_ANSWER_OPENER = re.compile(
    r"^\W*(?:sure\b|certainly\b|of course\b|absolutely\b|definitely\b|great question|good question|"
    r"here (?:is|are) (?:a |an |the |some |my |\d+ )?(?!(?:improved|optimi[sz]ed|rewritten|revised|refined|better|new) (?:prompt|instruction|version))|"
    r"here's (?!(?:an? |the |my )?(?:improved|optimi[sz]ed|rewritten|revised|refined|better|new) (?:prompt|instruction|version))|"
    r"i'm sorry|i am sorry|sorry,|i apologi[sz]e|i (?:can(?:no|')t|am unable|'m unable|won't|will not)\b|"
    r"as an ai\b|as a language model|yes[,.!]|no[,.!]|okay[,.!]|ok[,.!]|hello\b|hi[,!]|hey\b|thank you|thanks\b|"
    r"the answer is|in conclusion|to summari[sz]e)",
    re.IGNORECASE,
)
_REQUEST_START = re.compile(
    r"^\W*(?:please\b|kindly\b|can you|could you|would you|will you|i want|i need|i'd like|i would like|i'm looking|"
    r"i am looking|i'm trying|i am trying|help me|you are\b|you're\b|act as|imagine\b|pretend\b|suppose\b|assume\b|"
    r"let's\b|let us\b|your task|task:|instructions?:|how to\b|how do i\b|how can i\b|how should i\b)",
    re.IGNORECASE,
)
# Imperatives an instruction opens with; an answer opens with a statement instead.
_IMPERATIVES = frozenset(
    """add adapt analyse analyze answer arrange ask assess brainstorm build calculate categorize categorise
    change check choose civilize clarify classify come compare compile complete compose construct continue
    convert correct count craft create debug decide define demonstrate derive describe design detail determine
    develop devise discuss distinguish draft draw edit elaborate enumerate estimate evaluate examine explain
    explore express extract fill find finish fix format formulate generate give guess help highlight identify
    illustrate imagine implement improve include infer interpret introduce invent investigate judge justify
    label list locate make match mention modify name note offer order organize organise outline paraphrase
    pick plan predict prepare present produce proofread propose provide rank rate read recommend reflect
    reformulate remove rephrase replace reply report represent research respond restate restructure review
    revise rewrite say score select share show simplify solve sort specify state suggest summarise summarize
    tell test think transform translate turn use verify weigh write""".split()
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _first_word(text: str) -> str:
    match = _WORD.search(text)
    return match.group(0).lower() if match else ""


def _is_request(sentence: str) -> bool:
    sentence = sentence.strip()
    if sentence.endswith("?") or _REQUEST_START.match(sentence):
        return True
    if re.search(r"\bplease\b(?! note)", sentence, re.IGNORECASE):
        return True
    # "In one sentence, explain ..." / "Based on the data: write ...": an imperative opens a clause.
    return any(_first_word(clause) in _IMPERATIVES for clause in re.split(r"[,;:]", sentence))


def answered_reason(original: str, output: str) -> str | None:
    """Why an output reads as an answer to the prompt rather than a better prompt, or None.

    A rewrite is a request: it opens with an imperative, a question or a request phrase, or
    keeps the user's own opening. An answer opens with an assistant's phrase or a statement.
    """
    opener = _ANSWER_OPENER.match(output)
    if opener and _first_word(opener.group(0)) != _first_word(original):
        return f"opens like an answer ({opener.group(0).strip()!r})"
    head_words = original.split()[:4]
    if head_words and output.split()[: len(head_words)] == head_words:
        return None  # keeps the user's opening: an edit of the prompt, not a reply to it
    sentences = [s for s in _SENTENCE_END.split(output) if s.strip()]
    # Prompts put the request first or after the data it refers to, so read both ends.
    if any(_is_request(s) for s in sentences[:3] + sentences[-2:]):
        return None
    if not _is_request(original):
        # The user wrote a statement (a fragment, a passage to continue); statements are fair rewrites.
        return None
    return "reads as a statement, not a request"


# --- English only ----------------------------------------------------------------------------

# Function words of English, and of the languages most often written in Latin script besides it
# (French, Spanish, Portuguese, Italian, German, Dutch, Indonesian, Turkish, Vietnamese, Polish). A word
# that is also English ("a", "in", "die", "son", "come", "per", "pour", "plus", "no", "me") is left out
# of the foreign list, so names and quoted words do not tip an English prompt over.
_ENGLISH_WORDS = frozenset(
    """the a an and or but of to in on at for with from by about into over as is are was were be been am do does
    did have has had can could would should will shall may might must not no this that these those it its i me my
    you your we our they their he she his her him them what which who whom whose how why when where there here than
    then also if so any some all each every more most other such only just very please give tell write explain
    describe make list create help find show need want like know get let""".split()
)
_FOREIGN_WORDS = frozenset(
    """de le la les des du et est une un pour dans que qui pas sur avec ce cette sont je tu il nous vous ils elles mais
    ou aux au mon ma mes ne très quel quelle quels pourquoi être avoir peux puis faire comment
    el los las del y es en por para con una uno como más pero sus lo al se su esta este está muy hay yo tú cómo qué
    puedes estoy tengo sobre cuál cuáles dónde cuándo también porque
    der das und ist nicht ein eine einen zu mit sich auf für von dem den im auch ich du wie bitte kann können
    oder aber sind wir sie mir mich nach bei über werden wird haben hat
    il di che è della delle degli sono gli ho anche questo questa mi ti perché cosa sei molto puoi
    os da dos das em um uma não é você eu isso esse essa meu minha ele ela são pelo pela
    het een van ik je niet dat zijn op te voor met wat hoe kun kunt jij mijn ook
    yang dan di ini itu dengan untuk saya apa bagaimana tidak ada adalah dari akan
    qual quais onde quando também porque
    bir ve bu için ile çok nasıl nedir mi mı değil
    của và là có không một những cho được tôi các với này trong người
    nie się jest na jak czy że do jestem może""".split()
) - _ENGLISH_WORDS
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f\u1e00-\u1eff'’]+")
# Letters only Vietnamese writes (its tone marks on top of vowel marks, and đ, ơ, ư).
_VIETNAMESE = re.compile(r"[\u1ea0-\u1ef9đơư]")
# Scripts written without spaces between words: a character is about half a word.
_UNSPACED_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f]")
_OTHER_SCRIPT_WORD = re.compile(r"[^\W\d_A-Za-z\u00c0-\u024f\u1e00-\u1eff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f]+")
#: A prompt is judged not English when over this share of its words are.
NON_ENGLISH_SHARE = 0.5


def _language_counts(text: str) -> tuple[float, float, int, int]:
    """(Latin-script words, other-script words, English function words, foreign function words)."""
    latin = [w.lower().strip("'’") for w in _LATIN_WORD.findall(text)]
    other = len(_OTHER_SCRIPT_WORD.findall(text)) + len(_UNSPACED_CHAR.findall(text)) / 2
    foreign = sum(w in _FOREIGN_WORDS or bool(_VIETNAMESE.search(w)) for w in latin)
    return len(latin), other, sum(w in _ENGLISH_WORDS for w in latin), foreign


def _reads_foreign(text: str) -> str | None:
    latin, other, english, foreign = _language_counts(_QUOTED.sub(" ", text))
    if other and other / (latin + other) > NON_ENGLISH_SHARE:
        return f"{other / (latin + other):.0%} of its words are in a script other than Latin"
    # Latin script: a language other than English shows as its function words (code, numbers and
    # names have none of them, so they never count against a prompt).
    if foreign >= 2 and foreign > 1.5 * english and foreign / max(latin, 1) >= 0.15:
        return f"{foreign} of its {latin} words are function words of a language other than English, {english} of English"
    return None


def non_english_reason(prompt: str) -> str | None:
    """Why ``prompt`` reads as mostly not English, or None. Cheap and model-free, run before generating.

    BPO was trained on English pairs only and turns other languages into English (thu-coai/BPO #8,
    #13). Quoted text is not judged, and a prompt whose instruction line (before its first colon or
    line break) reads as English is English whatever data follows ("Translate to English: ...").
    """
    why = _reads_foreign(prompt)
    if why is None:
        return None
    head = re.split(r"[:\n]", prompt.strip(), maxsplit=1)[0]
    if head != prompt.strip() and _reads_foreign(head) is None and (
        _language_counts(head)[2] or _first_word(head) in _IMPERATIVES
    ):
        return None
    return f"the prompt reads as not English: {why}"


# --- the whole check -------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardConfig:
    min_length_ratio: float = MIN_LENGTH_RATIO
    max_length_ratio: float = MAX_LENGTH_RATIO
    check_answered: bool = True
    check_degenerate: bool = True
    min_term_recall: float = MIN_TERM_RECALL  # 0 turns the lost-subject check off
    check_payload: bool = True
    check_numbers: bool = True
    check_entities: bool = False
    #: Sentence-embedding cosine (MiniLM) a rewrite must keep with the prompt; 0 turns the check off.
    #: It is the one guard that loads a model (22M parameters), so the Rewriter runs it last.
    min_intent_cosine: float = 0.0
    #: Pass a prompt that is mostly not English through unchanged, before any generation
    #: (:func:`non_english_reason`). None: on for optimizers trained on BPO's English data (BPO's
    #: checkpoint or instruction), off for a general LLM as prompt engineer. False for a multilingual optimizer.
    english_only: bool | None = None

    @classmethod
    def strict(cls) -> GuardConfig:
        """For small optimizers (the bundled bpo-small), whose added names are inventions and whose
        drifts are real: names kept and none invented, and the MiniLM intent check on. Off by
        default for THUDM/BPO-class models and API LLMs, whose added names are mostly knowledge
        (9% of BPO's own reference rewrites add one)."""
        return cls(check_entities=True, min_intent_cosine=STRICT_INTENT_COSINE)


def check_rewrite(original: str, output: str, config: GuardConfig = GuardConfig()) -> tuple[FallbackReason, str] | None:
    """Return (reason, detail) when ``output`` must not replace ``original``; None when it may."""
    if not output.strip():
        return FallbackReason.EMPTY_OUTPUT, "the optimizer returned no text"
    if config.check_degenerate:
        why = degenerate_reason(original, output)
        if why:
            return FallbackReason.DEGENERATE, why
    if config.check_answered:
        why = answered_reason(original, output)
        if why:
            return FallbackReason.ANSWERED, why
    why = length_ratio_reason(original, output, config.min_length_ratio, config.max_length_ratio)
    if why:
        return FallbackReason.LENGTH_RATIO, why
    why = lost_terms_reason(original, output, config.min_term_recall)  # a bar of 0 never fires
    if why:
        return FallbackReason.LOST_TERMS, why
    if config.check_payload and (why := payload_lost_reason(original, output)):
        return FallbackReason.PAYLOAD_LOST, why
    if config.check_numbers and (why := numbers_lost_reason(original, output)):
        return FallbackReason.NUMBERS_LOST, why
    if config.check_entities:
        return entities_reason(original, output)
    return None
