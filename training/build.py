"""``bpo data build``: preference triplets -> optimized-prompt pairs, the way the BPO paper built them.

A teacher LLM (any core backend: OpenAI-compatible incl. vLLM, Anthropic, or a local model) compares
the good and the bad response, then writes an improved instruction. Pairs then pass BPO's filters
(length ratio, leftover markers), ours (answered-not-rewrote, near duplicates, self-BLEU diversity).
Output is THUDM/BPO-schema JSONL, appended as it goes so an interrupted run resumes.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpo_plugins.backends.base import Backend
from bpo_plugins.decoding import Decoding
from bpo_plugins.guards import answered_reason, has_marker, length_ratio_reason
from bpo_plugins.inputs import resume_jsonl
from bpo_plugins.templates import PromptTemplate
from bpo_plugins.training.data import Pair, Triplet, normalise

# Our wording of the paper's two comparison prompts (thu-coai/BPO src/data_construction).
__all__ = ["TEACHER_PROMPT", "TEACHER_PROMPT_WITH_CONTEXT", "TEACHER_SYSTEM", "TEACHER_TEMPLATE", "BuildReport", "bleu", "build",
           "dedupe", "diversity_filter", "filter_reason", "parse_teacher", "teacher_prompt"]

TEACHER_SYSTEM = (
    "You are an expert prompt engineer. You study how an instruction led an AI assistant to a better "
    "and a worse response, then improve the instruction so that assistants produce the better kind."
)
TEACHER_PROMPT = """Here is an instruction a user gave to an AI assistant, with a better and a worse response to it.

[Instruction]
{instruction}

[Better response]
{good}

[Worse response]
{bad}

First compare the two responses: what makes the better one more correct, helpful and harmless, and
what the worse one lacks. Then write an improved version of the instruction that would lead an
assistant towards the better response. Rules:
- keep every piece of information in the original instruction;
- do not add over-specific constraints the user did not ask for;
- do not answer the instruction, and do not mention the responses;
- keep the user's language and point of view.

Write your comparison, then end with exactly:
Optimized Instruction: <the improved instruction> [END]"""

TEACHER_PROMPT_WITH_CONTEXT = """Here is an instruction a user gave to an AI assistant together with a context passage, and a better and a worse response.

[Instruction]
{instruction}

[Context]
{context}

[Better response]
{good}

[Worse response]
{bad}

First compare the two responses: what makes the better one more correct, helpful and harmless, and
what the worse one lacks. Then write an improved version of the instruction only. Rules:
- keep every piece of information in the original instruction;
- do not change the context, quote it or move it into the instruction;
- do not add over-specific constraints the user did not ask for;
- do not answer the instruction, and do not mention the responses.

Write your comparison, then end with exactly:
Optimized Instruction: <the improved instruction> [END]"""

TEACHER_TEMPLATE = PromptTemplate(name="bpo-teacher", user="{prompt}", system=TEACHER_SYSTEM)
_OPTIMIZED = re.compile(r"optimi[sz]ed\s+instruction\s*[:：]\s*(.*?)(?:\[END\]|$)", re.IGNORECASE | re.DOTALL)
#: The teacher prompt's own headings, which a rewrite must not carry over; runtime's markers
#: (:data:`~bpo_plugins.guards.CUT_MARKERS`) drop a rewrite too (:func:`~bpo_plugins.guards.has_marker`).
TEACHER_HEADINGS = ("[better response]", "[worse response]", "optimized instruction")


def teacher_prompt(triplet: Triplet) -> str:
    fields = {"instruction": triplet.prompt, "good": triplet.chosen, "bad": triplet.rejected, "context": triplet.context}
    template = TEACHER_PROMPT_WITH_CONTEXT if triplet.context else TEACHER_PROMPT
    # str.replace: user text is full of braces that str.format would trip on.
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value or "")
    return template


def parse_teacher(output: str) -> str | None:
    """The teacher's optimized instruction (the last one, if it wrote several), or None."""
    found = _OPTIMIZED.findall(output or "")
    if not found:
        return None
    text = found[-1].strip().strip('"').strip()
    return text or None


# --- filters -----------------------------------------------------------------------------------


def filter_reason(original: str, optimized: str) -> str | None:
    """BPO's per-pair filters plus answered-not-rewrote; None when the pair is kept."""
    if length_ratio_reason(original, optimized):
        return "length_ratio"
    if has_marker(optimized) or any(heading in optimized.lower() for heading in TEACHER_HEADINGS):
        return "leftover_marker"
    if answered_reason(original, optimized):
        return "answered"
    return None


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def dedupe(pairs: Sequence[Pair], threshold: float = 0.8) -> tuple[list[Pair], int, int]:
    """Drop exact duplicate prompts, then near duplicates (word 3-gram Jaccard >= threshold)."""
    exact: dict[str, Pair] = {}
    for pair in pairs:
        exact.setdefault(normalise(pair.prompt), pair)
    n_exact = len(pairs) - len(exact)
    kept: list[Pair] = []
    kept_shingles: list[set[tuple[str, ...]]] = []
    index: dict[tuple[str, ...], list[int]] = {}
    n_near = 0
    for pair in exact.values():
        shingles = _shingles(pair.prompt)
        candidates = {i for s in shingles for i in index.get(s, [])}
        if any(len(shingles & kept_shingles[i]) / max(len(shingles | kept_shingles[i]), 1) >= threshold for i in candidates):
            n_near += 1
            continue
        for s in shingles:
            index.setdefault(s, []).append(len(kept))
        kept.append(pair)
        kept_shingles.append(shingles)
    return kept, n_exact, n_near


def bleu(hypothesis: str, references: Sequence[str], max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing (enough to rank self-similarity)."""
    hyp = re.findall(r"\w+", hypothesis.lower())
    refs = [re.findall(r"\w+", r.lower()) for r in references]
    if not hyp or not refs:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        best: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            best |= Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        overlap = sum(min(count, best[g]) for g, count in grams.items())
        log_precision += math.log((overlap + 1) / (sum(grams.values()) + 1)) / max_n
    closest = min((len(r) for r in refs), key=lambda length: abs(length - len(hyp)))
    brevity = 1.0 if len(hyp) > closest else math.exp(1 - closest / max(len(hyp), 1))
    return brevity * math.exp(log_precision)


def diversity_filter(pairs: Sequence[Pair], max_self_bleu: float = 0.6, sample: int = 50, seed: int = 0) -> tuple[list[Pair], int]:
    """Drop optimized prompts that read like templated copies of others (self-BLEU above the bar)."""
    rng = random.Random(seed)
    texts = [p.optimized for p in pairs]
    kept = []
    for i, pair in enumerate(pairs):
        others = [texts[j] for j in rng.sample(range(len(texts)), min(sample + 1, len(texts))) if j != i][:sample]
        if others and bleu(pair.optimized, others) > max_self_bleu:
            continue
        kept.append(pair)
    return kept, len(pairs) - len(kept)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class BuildReport:
    inputs: int = 0
    resumed: int = 0
    generated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "resumed": self.resumed, "generated": self.generated, "dropped": dict(self.dropped), "kept": self.kept}


def _call_with_retry(call: Callable[[], Any], retries: int = 4, base_delay: float = 1.0) -> Any:
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception:
            if attempt == retries:
                raise
            time.sleep(base_delay * 2**attempt * (1 + random.random()))


def _ask_teacher(todo: Sequence[Triplet], teacher: Backend, raw_path: Path, done: dict[str, dict[str, Any]], report: BuildReport, *,
                 concurrency: int, temperature: float, max_new_tokens: int, retries: int,
                 progress: Callable[[int], None] | None) -> None:
    """The teacher's output for every triplet in ``todo``, appended to ``raw_path`` as it comes (and to ``done``)."""
    decoding = Decoding(do_sample=temperature > 0, temperature=temperature or 1.0, max_new_tokens=max_new_tokens)
    raw_path.parent.mkdir(parents=True, exist_ok=True)

    def ask(triplet: Triplet) -> dict[str, Any]:
        try:
            output = _call_with_retry(
                lambda: teacher.generate([teacher_prompt(triplet)], TEACHER_TEMPLATE, decoding, None), retries=retries
            )
            text = output.generations[0].texts[0]
        except Exception as exc:  # recorded, not fatal: one bad request must not stop a 14k-row run
            text, error = "", f"{type(exc).__name__}: {exc}"
        else:
            error = None
        return {"key": triplet.key, "teacher_output": text, "error": error}

    with raw_path.open("a", encoding="utf-8") as sink, ThreadPoolExecutor(max_workers=concurrency) as pool:
        for triplet, row in zip(todo, pool.map(ask, todo)):
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            done[triplet.key] = row
            report.generated += 1
            if progress:
                progress(1)


def _kept_pairs(triplets: Sequence[Triplet], done: dict[str, dict[str, Any]], report: BuildReport) -> list[Pair]:
    """The pairs whose teacher output parses and passes BPO's per-pair filters; the rest counted in ``report.dropped``."""
    pairs = []
    for triplet in triplets:
        row = done.get(triplet.key, {})
        if row.get("error"):
            report.dropped["teacher_error"] += 1
            continue
        optimized = parse_teacher(row.get("teacher_output", ""))
        if optimized is None:
            report.dropped["unparsed"] += 1
            continue
        reason = filter_reason(triplet.prompt, optimized)
        if reason:
            report.dropped[reason] += 1
            continue
        pairs.append(Pair(triplet.prompt, optimized, triplet.chosen, triplet.rejected, triplet.context, triplet.source))
    return pairs


def build(
    triplets: Sequence[Triplet],
    teacher: Backend,
    out: Path,
    *,
    concurrency: int = 8,
    temperature: float = 0.9,
    max_new_tokens: int = 1024,
    near_duplicate: float = 0.8,
    max_self_bleu: float = 0.6,
    retries: int = 4,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Ask the teacher for every triplet not yet in ``out``.raw.jsonl, then filter into ``out``."""
    report = BuildReport(inputs=len(triplets))
    raw_path = out.with_suffix(".raw.jsonl")
    # A torn last line from an interrupted run is cut (inputs.resume_jsonl, the one resume rule) and asked again.
    done: dict[str, dict[str, Any]] = {row["key"]: row for row in resume_jsonl(raw_path) if isinstance(row, dict) and "key" in row}
    report.resumed = len(done)
    todo = [t for t in triplets if t.key not in done]
    _ask_teacher(todo, teacher, raw_path, done, report, concurrency=concurrency, temperature=temperature,
                 max_new_tokens=max_new_tokens, retries=retries, progress=progress)
    pairs = _kept_pairs(triplets, done, report)
    pairs, n_exact, n_near = dedupe(pairs, near_duplicate)
    report.dropped["exact_duplicate"] += n_exact
    report.dropped["near_duplicate"] += n_near
    pairs, n_similar = diversity_filter(pairs, max_self_bleu)
    report.dropped["self_bleu"] += n_similar
    report.kept = len(pairs)
    report.dropped = +report.dropped  # only the filters that dropped something
    out.write_text("".join(json.dumps(p.to_bpo(), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    out.with_suffix(".report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
