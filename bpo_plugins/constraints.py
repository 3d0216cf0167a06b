"""The user's explicit constraints, and whether a rewrite keeps them.

A rewrite may add requirements, but it may not drop or contradict what the user asked for in so many
words: a length ("short", "briefly", "in 50 words", "one sentence"), a count ("three tips"), a format
("a table", "JSON", "bullet points", "code only"), an audience ("for a 10-year-old", "for beginners")
or a language ("in Spanish", "in Python"). "Write a short product description" rewritten to "Write a
detailed product description ..." keeps the topic, so MiniLM and the word-recall guards pass it; this
module does not. Model-free and pure: regular expressions over the prompt and the rewrite.

Our addition to BPO (docs/faithfulness.md): ``GuardConfig(check_constraints=...)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Constraint", "Violation", "constraint_reason", "extract_constraints", "violations"]

Kind = Literal["length", "count", "format", "audience", "language"]


@dataclass(frozen=True)
class Constraint:
    """One explicit constraint: its kind, a canonical value compared across texts, and the user's words."""

    kind: Kind
    value: str
    text: str


@dataclass(frozen=True)
class Violation:
    """A constraint of the prompt the rewrite dropped ("lost") or contradicted ("inverted", with its words)."""

    constraint: Constraint
    verdict: Literal["lost", "inverted"]
    found: str = ""

    def describe(self) -> str:
        what = f"the {self.constraint.kind} constraint {self.constraint.text!r}"
        if self.verdict == "inverted":
            return f"the rewrite contradicts {what} (it says {self.found!r})"
        return f"the rewrite drops {what}"


# --- length ----------------------------------------------------------------------------------

_SHORT = (
    r"short(?!\s*(?:-|\s)term)(?!\s+(?:of|for|films?|movies?)\b)|shorter(?!\s+than)|brief(?:ly)?|concise(?:ly)?|succinct(?:ly)?|terse(?:ly)?|"
    r"in a nutshell|tl;?dr|one[- ]liner|to the point|in (?:a )?few words|in (?:a )?few sentences"
)
_LONG = (
    r"detailed|in detail|in[- ]depth|comprehensive(?:ly)?|thorough(?:ly)?|extensive(?:ly)?|exhaustive(?:ly)?|"
    r"elaborate(?:ly)?|lengthy|at length|long(?:er)?(?=\s+(?:essay|article|answer|response|explanation|story|text|post|"
    r"paragraph|description|report|list|letter|email|version|form)s?\b)"
)
_LENGTH_WORD = re.compile(rf"(?<![\w-])(?:(?P<short>{_SHORT})|(?P<long>{_LONG}))(?![\w-])", re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:not|no|never|without|avoid(?:ing)?|don'?t|doesn'?t|shouldn'?t|isn'?t|instead of|rather than)\b"
                       r"(?:\s+\w+){0,3}\s*$", re.IGNORECASE)
_IN_SHORT = re.compile(r"\bin short\b", re.IGNORECASE)  # a discourse marker, not a length
# Said of a rewrite only: it keeps a request for length ("in detail" -> "include details about ...").
_KEEPS_LONG = re.compile(r"\b(?:details|step[- ]by[- ]step|at least \d+)\b", re.IGNORECASE)

_NUMBER_WORDS = {w: n for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_NUMBER = r"\d{1,4}|" + "|".join(_NUMBER_WORDS) + r"|a single|single"
_UNITS = r"words?|sentences?|paragraphs?|lines?|characters?|bullet[- ]points?|bullets?|pages?|syllables?"
# Up to two describing words between a number and its unit ("two short paragraphs"), not function words
# ("one of the words" is no length).
_FILLER = r"(?:(?!(?:of|the|a|an|to|in|for|and|or|from|with|by|on|at|about|that|this|these|those|each|per|every)\b)[a-z-]+,?\s+){0,2}"
_AMOUNT = re.compile(rf"(?<![\w.])(?P<n>{_NUMBER})(?:\s*(?:-|to|or)\s*(?P<m>\d{{1,4}}|{'|'.join(_NUMBER_WORDS)}))?,?\s+"
                     rf"{_FILLER}(?P<unit>{_UNITS})\b", re.IGNORECASE)
_IN_A_UNIT = re.compile(r"\bin (?:a|one) (?:single )?(?P<unit>word|sentence|paragraph|line|tweet)\b", re.IGNORECASE)


def _number(word: str) -> int:
    word = word.lower()
    if word in ("a single", "single"):
        return 1
    return int(word) if word.isdigit() else _NUMBER_WORDS[word]


def _unit(word: str) -> str:
    word = re.sub(r"[- ]", " ", word.lower())
    word = "bullet point" if word.startswith("bullet") else word
    return word[:-1] if word.endswith("s") else word


def _length_classes(text: str) -> dict[str, str]:
    """{"short"|"long": the words that say so}, a negated word counting for the other side ("not too detailed")."""
    found: dict[str, str] = {}
    scrubbed = _IN_SHORT.sub("   ", text)
    for match in _LENGTH_WORD.finditer(scrubbed):
        side = "short" if match.group("short") else "long"
        if _NEGATION.search(scrubbed[max(0, match.start() - 40) : match.start()]):
            side = "long" if side == "short" else "short"
        found.setdefault(side, match.group(0))
    return found


def _amounts(text: str) -> dict[str, tuple[set[int], str]]:
    """{unit: (numbers, the words)} of the lengths a text states ("in 50 words", "3-4 sentences", "in a sentence")."""
    found: dict[str, tuple[set[int], str]] = {}
    for match in _AMOUNT.finditer(text):
        numbers = {_number(match.group("n"))} | ({_number(match.group("m"))} if match.group("m") else set())
        if _unit(match.group("unit")) == "character" and max(numbers) < 20:
            continue  # "two characters in the story" are people, "under 280 characters" a length
        found.setdefault(_unit(match.group("unit")), (set(), match.group(0)))[0].update(numbers)
    for match in _IN_A_UNIT.finditer(text):
        found.setdefault(_unit(match.group("unit")), (set(), match.group(0)))[0].add(1)
    return found


# --- counts ----------------------------------------------------------------------------------

# "three tips", "5 examples", "top 10": a small number before a plural noun. Lengths are handled above;
# times, dates and measures are quantities in the task, which the numbers guard keeps.
_NOT_COUNTED = frozenset(
    """years months weeks days hours minutes seconds times percent dollars euros pounds degrees meters metres miles km kg
    grams inches feet cm mm milliseconds centimeters centimetres people persons kids children members players apples
    plus minus this thus does goes yes less was has its his""".split()
)
_COUNT = re.compile(rf"(?<![\w.$£€])(?P<n>\d{{1,2}}|{'|'.join(w for w in _NUMBER_WORDS if w not in ('zero', 'one'))})\s+"
                    rf"{_FILLER}(?P<noun>[a-z]+s)\b|\btop (?P<top>\d{{1,2}}|{'|'.join(_NUMBER_WORDS)})\b", re.IGNORECASE)


def _counts(text: str) -> dict[str, tuple[int, str]]:
    """{plural noun (or "top"): (number, the words)} of the counts a text asks for."""
    found: dict[str, tuple[int, str]] = {}
    for match in _COUNT.finditer(text):
        if match.group("top"):
            found.setdefault("top", (_number(match.group("top")), match.group(0)))
            continue
        noun = match.group("noun").lower()
        if noun in _NOT_COUNTED or re.fullmatch(_UNITS, noun, re.IGNORECASE):
            continue
        found.setdefault(noun, (_number(match.group("n")), match.group(0)))
    return found


def _numbers_said(text: str) -> set[int]:
    words = re.findall(r"\d+|[a-z]+", text.lower())
    return {int(w) for w in words if w.isdigit() and len(w) < 6} | {_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS}


# --- formats ---------------------------------------------------------------------------------

# (value, what in the prompt makes it a constraint, what in the rewrite keeps it)
_FORMATS: tuple[tuple[str, re.Pattern[str], re.Pattern[str]], ...] = tuple(
    (value, re.compile(asked, re.IGNORECASE), re.compile(kept, re.IGNORECASE))
    for value, asked, kept in (
        ("list", r"\b(?:bullet(?:ed)?[- ]?(?:points?|list)|bulleted|numbered list|in a list|as a list|(?:make|create|give|provide|"
                 r"write|generate|compile|prepare) (?:me )?(?:a |an )?(?:\w+ )?list)\b|^\s*list\b",
         r"\b(?:list|lists|listing|bullet(?:s|ed)?|numbered|enumerate|itemi[sz]e)\b"),
        ("table", r"\b(?:(?:in|as|into|using|create|make|produce|generate|draw|build|with|format(?:ted)? (?:as|in|into)) "
                  r"(?:a |an |the )?(?:\w+ )?table|table format|tabular)\b",
         r"\b(?:table|tables|tabular)\b"),
        ("JSON", r"\bjson\b", r"\bjson\b"),
        ("CSV", r"\bcsv\b", r"\bcsv\b"),
        ("YAML", r"\bya?ml\b", r"\bya?ml\b"),
        ("XML", r"\bxml\b", r"\bxml\b"),
        ("Markdown", r"\bmarkdown\b", r"\bmarkdown\b"),
        ("code only", r"\b(?:(?:only|just) (?:give |show |return |output |write |provide )?(?:me )?(?:the )?code|code only|"
                      r"no explanations?|without (?:any )?explanations?)\b",
         r"\b(?:(?:only|just) (?:give |show |return |output |write |provide )?(?:me )?(?:the )?code|code only|"
         r"no explanations?|without (?:any )?explanations?|only (?:the |a )?(?:\w+ )?(?:code|script|function|snippet))\b"),
        ("yes or no", r"\b(?:yes or no|yes/no|true or false)\b", r"\b(?:yes\W{0,3}(?:or|/)\W{0,3}no|true\W{0,3}or\W{0,3}false)\b"),
    )
)


# --- audience --------------------------------------------------------------------------------

# Groups of words that name the same reader; a rewrite keeps the audience by naming any of its group.
_AUDIENCES: dict[str, str] = {
    "child": r"kids?|child(?:ren)?|toddlers?|(?:[1-9]|1[0-2]|" + "|".join(list(_NUMBER_WORDS)[1:13]) + r")[- ]years?[- ]olds?|little ones|eli5|like i'?m (?:five|5)|"
             r"(?:first|second|third|fourth|fifth|1st|2nd|3rd|4th|5th)[- ]graders?|elementary school",
    "teen": r"teens?|teenagers?|high[- ]school(?:ers)?|middle[- ]school(?:ers)?|adolescents?",
    "non-expert": r"beginners?|novices?|newbies?|newcomers?|non-?experts?|non-?technical|laypeople|laymen|layman|layperson|"
                  r"lay (?:audience|readers?|person)|general (?:audience|public|reader)|dummies|someone new|"
                  r"simple terms|plain (?:language|english|terms)|layman'?s terms|simple language|easy to understand",
    "expert": r"experts?|specialists?|professionals?|advanced (?:users?|readers?|audience|learners?)|phd|academics?|researchers?",
}
_AUDIENCE_ASKED = re.compile(
    r"\b(?:for|to|at|towards?|aimed at|targeted at|audience(?: of)?|readers?(?: who are)?|like i'?m|as if (?:i|you) were)\s+"
    r"(?:a |an |the |my |our |some |young |curious |complete |total |absolute )?"
    r"(?P<who>" + "|".join(_AUDIENCES.values()) + r")\b|\b(?P<plain>eli5|in (?:" + _AUDIENCES["non-expert"] + r"))\b",
    re.IGNORECASE,
)
_AUDIENCE_GROUP = {name: re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE) for name, pattern in _AUDIENCES.items()}
_OPPOSITE_AUDIENCE = {"child": "expert", "teen": "expert", "non-expert": "expert", "expert": "non-expert"}


def _audience_group(words: str) -> str:
    return next(name for name, pattern in _AUDIENCE_GROUP.items() if pattern.search(words))


# --- language --------------------------------------------------------------------------------

_NATURAL = ("english spanish french german italian portuguese chinese mandarin cantonese japanese korean russian arabic hindi "
            "bengali urdu dutch swedish norwegian danish finnish polish turkish greek hebrew latin vietnamese thai indonesian "
            "malay persian farsi swahili ukrainian czech romanian hungarian tagalog").split()
_PROGRAMMING = ("python javascript typescript java c\\+\\+ c# golang rust ruby php sql swift kotlin bash powershell matlab "
                "haskell scala perl lua dart julia").split()
_LANGUAGE = r"(?P<lang>" + "|".join(_NATURAL + _PROGRAMMING) + r")(?![\w+#])"
_LANGUAGE_ASKED = re.compile(
    r"\b(?:in|into|to|from|using|with|use|via|translated?|translating|translation)\s+(?:the\s+)?(?:\w+\s+)?" + _LANGUAGE
    + r"|(?<![\w+#])" + _LANGUAGE.replace("?P<lang>", "?P<lang2>")
    + r"\s+(?:code|script|program|function|class|module|implementation|translation|version|language|speakers?|one-liner|commands?|snippet|query)\b",
    re.IGNORECASE,
)


def _language_kind(name: str) -> str:
    return "natural" if name.lower() in _NATURAL else "programming"


def _languages(text: str) -> dict[str, str]:
    """{language name: the words that ask for it}."""
    found: dict[str, str] = {}
    for match in _LANGUAGE_ASKED.finditer(text):
        name = (match.group("lang") or match.group("lang2")).lower()
        found.setdefault(name, match.group(0))
    return found


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w+#]){re.escape(name)}(?![\w+#])", text, re.IGNORECASE) is not None


# --- the check -------------------------------------------------------------------------------


def extract_constraints(text: str) -> list[Constraint]:
    """The explicit constraints ``text`` states, in a fixed order (length, count, format, audience, language)."""
    found: list[Constraint] = []
    for side, words in _length_classes(text).items():
        found.append(Constraint("length", side, words))
    for unit, (numbers, words) in _amounts(text).items():
        found.append(Constraint("length", f"{'-'.join(map(str, sorted(numbers)))} {unit}", words.strip()))
    for noun, (number, words) in _counts(text).items():
        found.append(Constraint("count", f"{number} {noun}", words.strip()))
    for value, asked, _ in _FORMATS:
        if match := asked.search(text):
            found.append(Constraint("format", value, match.group(0).strip()))
    for match in _AUDIENCE_ASKED.finditer(text):
        group = _audience_group(match.group("who") or match.group("plain"))
        if all(c.value != group for c in found if c.kind == "audience"):
            found.append(Constraint("audience", group, match.group(0).strip()))
    for name, words in _languages(text).items():
        found.append(Constraint("language", name, words.strip()))
    return found


def violations(original: str, rewrite: str) -> list[Violation]:
    """Every constraint of ``original`` that ``rewrite`` drops or contradicts; empty when it keeps them all."""
    asked = extract_constraints(original)
    if not asked:
        return []
    out: list[Violation] = []
    sides = _length_classes(rewrite)
    amounts = _amounts(rewrite)
    counts = _counts(rewrite)
    numbers = _numbers_said(rewrite)
    for c in asked:
        if c.kind == "length" and c.value in ("short", "long"):
            if c.value in sides or (c.value == "long" and "short" not in sides and _KEEPS_LONG.search(rewrite)):
                continue
            other = "long" if c.value == "short" else "short"
            # A stated amount on the same side keeps it ("briefly" -> "in two sentences").
            if c.value == "short" and any(u in amounts for u in ("word", "sentence", "line", "tweet")):
                continue
            out.append(Violation(c, "inverted", sides[other]) if other in sides else Violation(c, "lost"))
        elif c.kind == "length":
            unit = c.value.split(" ", 1)[1]
            wanted = {int(n) for n in c.value.split(" ", 1)[0].split("-")}
            stated, words = amounts.get(unit, (set(), ""))
            if wanted & stated:
                continue
            if stated:
                out.append(Violation(c, "inverted", words.strip()))
            elif (c.value == "1 sentence" and "short" in sides) or (wanted <= numbers and _mentions(rewrite, unit)):
                continue  # "in one sentence" -> "in a single, short sentence"; "50 words" -> "words: 50"
            else:
                out.append(Violation(c, "lost"))
        elif c.kind == "count":
            number, noun = c.value.split(" ", 1)
            if int(number) in numbers:
                continue
            other = counts.get(noun)
            out.append(Violation(c, "inverted", other[1].strip()) if other is not None else Violation(c, "lost"))
        elif c.kind == "format":
            kept = next(k for v, _, k in _FORMATS if v == c.value)
            if not kept.search(rewrite):
                out.append(Violation(c, "lost"))
        elif c.kind == "audience":
            if _AUDIENCE_GROUP[c.value].search(rewrite):
                continue
            opposite = _AUDIENCE_GROUP[_OPPOSITE_AUDIENCE[c.value]].search(rewrite)
            out.append(Violation(c, "inverted", opposite.group(0)) if opposite else Violation(c, "lost"))
        elif c.kind == "language":
            if _mentions(rewrite, c.value):
                continue
            others = [n for n in _languages(rewrite) if _language_kind(n) == _language_kind(c.value)]
            out.append(Violation(c, "inverted", others[0]) if others else Violation(c, "lost"))
    return out


def constraint_reason(original: str, rewrite: str) -> str | None:
    """Why ``rewrite`` may not replace ``original`` (a dropped or contradicted constraint), or None."""
    found = violations(original, rewrite)
    if not found:
        return None
    first = next((v for v in found if v.verdict == "inverted"), found[0])
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return first.describe() + more
