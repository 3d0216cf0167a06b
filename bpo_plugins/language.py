"""Is a prompt English? A cheap, model-free reading, run before generating (BPO was trained on English
pairs only), and the word lists the guards share: English imperatives, words, quoted text."""

from __future__ import annotations

import re

__all__ = ["IMPERATIVES", "NON_ENGLISH_SHARE", "QUOTED", "WORD", "first_word", "non_english_reason"]

#: A word, in any script.
WORD = re.compile(r"\w+", re.UNICODE)
#: Quoted text: straight, curly and angle quotes, and code spans.
QUOTED = re.compile(r'"([^"\n]{3,})"|“([^”]{3,})”|«([^»]{3,})»|(?<![\w])\'([^\'\n]{3,})\'(?![\w])|```(.+?)```|`([^`\n]{2,})`', re.DOTALL)

# Imperatives an instruction opens with; an answer opens with a statement instead.
IMPERATIVES = frozenset(
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


def first_word(text: str) -> str:
    match = WORD.search(text)
    return match.group(0).lower() if match else ""


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
    latin, other, english, foreign = _language_counts(QUOTED.sub(" ", text))
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
        _language_counts(head)[2] or first_word(head) in IMPERATIVES
    ):
        return None
    return f"the prompt reads as not English: {why}"
