"""Two teacher-free proxies of how much a prompt version helps a target model, for ``bpo data selfplay``.

* **likelihood preference**: the target's mean log-probability per token of the preferred response
  minus that of the rejected one, each teacher-forced after the prompt in the target's own chat
  template. No generation, so it is cheap; it needs token log-probabilities, i.e. a local
  transformers model (:class:`LikelihoodScorer`).
* **answer margin**: cos(answer, preferred) - cos(answer, rejected) in MiniLM for the target's greedy
  answer (:func:`answer_margins`). It only needs text, so it works for any backend the core has,
  an API model without log-probabilities included.

A version *wins* against the raw prompt when its score beats the raw prompt's by more than the tie
band, *loses* when it is below by more, and ties otherwise (:func:`win_tie_loss`).
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Sequence
from typing import Any

from bpo_plugins.backends.base import Backend
from bpo_plugins.decoding import Decoding
from bpo_plugins.templates import TARGET, PromptTemplate
from bpo_plugins.training.cache import JsonlCache

__all__ = ["ANSWER_TIE_BAND", "LIKELIHOOD_TIE_BAND", "RAW_TARGET", "TARGET_CHAT", "LikelihoodScorer", "ScoreCache", "answer_margins",
           "target_answers", "target_template", "target_text", "win_tie_loss"]

#: |delta| below this many nats per token is a tie between two prompt versions (likelihood preference).
LIKELIHOOD_TIE_BAND = 0.01
#: |delta| below this cosine difference is a tie (answer margin).
ANSWER_TIE_BAND = 0.01

#: The prompt as the user's turn, in the target's own chat template (no system text of ours).
TARGET_CHAT = TARGET
#: A target without a chat template (a base model): the prompt, a line break, then the response.
RAW_TARGET = PromptTemplate(name="target-raw", user="{prompt}", raw="{user}\n")


def target_text(prompt: str, context: str | None = None) -> str:
    """What the target reads: the prompt, then its context passage (as ``bpo eval`` sends them)."""
    return prompt if not context else f"{prompt}\n\n{context}"


def target_template(backend: Backend) -> PromptTemplate:
    """The chat template for chat models (local or API), the raw layout for a local model without one."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        return RAW_TARGET
    return TARGET_CHAT


#: Self-play's score cache: the training package's one JSONL cache.
ScoreCache = JsonlCache


class LikelihoodScorer:
    """Teacher-forced mean log-prob per token of a response after a prompt, on a local causal LM.

    The response is scored on its first ``max_response_tokens`` tokens (the end-of-turn token is
    not scored). Sequences go through the model in length-sorted batches of ``batch_size``; every
    (prompt version, response) score is cached, so the raw prompt and the reference responses are
    computed once per run.
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_id: str = "", template: PromptTemplate | None = None,
                 max_response_tokens: int = 128, batch_size: int = 8, cache: ScoreCache | None = None) -> None:
        self.model = model.eval() if hasattr(model, "eval") else model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.template = template or (TARGET_CHAT if tokenizer.chat_template else RAW_TARGET)
        self.max_response_tokens = max_response_tokens
        self.batch_size = batch_size
        self.cache = cache or ScoreCache()
        self._lock = threading.Lock()

    @classmethod
    def from_backend(cls, backend: Backend, **options: Any) -> LikelihoodScorer:
        """The scorer over a loaded local transformers backend (shares its weights)."""
        model, tokenizer = getattr(backend, "model", None), getattr(backend, "tokenizer", None)
        if model is None or tokenizer is None or not hasattr(model, "forward"):
            raise ValueError(
                f"the likelihood preference needs token log-probabilities from a local transformers model; "
                f"{backend.describe() if hasattr(backend, 'describe') else backend!r} has none: score it with the answer margin"
            )
        options.setdefault("model_id", f"{backend.model_id}@{backend.revision}")
        options.setdefault("template", target_template(backend))
        return cls(model, tokenizer, **options)

    def prefix_ids(self, prompt: str) -> list[int]:
        """The token ids the target reads before its answer: the rendered prompt, ready to continue."""
        text = self.template.render(prompt, self.tokenizer)
        return list(self.tokenizer(text, add_special_tokens=self.template.raw is not None)["input_ids"])

    def response_ids(self, response: str) -> list[int]:
        return list(self.tokenizer(response, add_special_tokens=False)["input_ids"])[: self.max_response_tokens]

    def mean_logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Mean log-prob per response token for each (prompt, response), cached."""
        keys = [ScoreCache.key("lp", self.model_id, str(self.max_response_tokens), self.template.name, p, r) for p, r in pairs]
        todo = {k: pair for k, pair in zip(keys, pairs) if self.cache.get(k) is None}
        if todo:
            self.cache.put_many(self._compute(todo))
        return [float(self.cache.get(k)) for k in keys]

    def preferences(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        """The likelihood preference of each (prompt as the target reads it, preferred, rejected)."""
        flat = [(p, r) for p, good, bad in items for r in (good, bad)]
        scores = self.mean_logprobs(flat)
        return [scores[2 * i] - scores[2 * i + 1] for i in range(len(items))]

    def _compute(self, todo: dict[str, tuple[str, str]]) -> dict[str, float]:
        import torch

        rows = []
        for key, (prompt, response) in todo.items():
            prefix, target = self.prefix_ids(prompt), self.response_ids(response)
            if not target:
                raise ValueError(f"an empty response cannot be scored (prompt {prompt[:60]!r})")
            rows.append((key, prefix, target))
        rows.sort(key=lambda row: len(row[1]) + len(row[2]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = getattr(self.model, "device", "cpu")
        out: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                width = max(len(p) + len(t) for _, p, t in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (_, prefix, target) in enumerate(chunk):
                    seq = prefix + target
                    ids[i, : len(seq)] = torch.tensor(seq)
                    mask[i, : len(seq)] = 1  # right padding: positions are those of an unpadded row
                hidden = self._hidden(ids.to(device), mask.to(device))
                for i, (key, prefix, target) in enumerate(chunk):
                    # Position t predicts token t+1: the response's tokens are predicted from len(prefix)-1 on.
                    at = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(target), device=hidden.device)
                    logprobs = torch.log_softmax(self._logits(hidden[i, at]).float(), dim=-1)
                    picked = logprobs[torch.arange(len(target)), torch.tensor(target, device=logprobs.device)]
                    out[key] = float(picked.mean())
        return out


    def _hidden(self, ids: Any, mask: Any) -> Any:
        """Final hidden states; the vocabulary projection is then applied at the response positions only
        (a 49k-word head over every prompt token is most of the cost otherwise). Logits for models
        without a separate decoder."""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if decoder is None or self.model.get_output_embeddings() is None:
            return self.model(input_ids=ids, attention_mask=mask).logits
        return decoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def _logits(self, states: Any) -> Any:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        return states if head is None or decoder is None else head(states)


def target_answers(backend: Backend, prompts: Sequence[str], *, max_new_tokens: int = 128, batch_size: int = 8,
                   cache: ScoreCache | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
    """The target's greedy answers, cached per (target, prompt, budget); local targets answer in batches."""
    cache = cache or ScoreCache()
    template = target_template(backend)
    identity = f"{backend.model_id}@{getattr(backend, 'revision', '')}"
    keys = [ScoreCache.key("answer", identity, str(max_new_tokens), template.name, p) for p in prompts]
    todo = [(k, p) for k, p in dict(zip(keys, prompts)).items() if cache.get(k) is None]
    decoding = Decoding(max_new_tokens=max_new_tokens)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        output = backend.generate([p for _, p in chunk], template, decoding, None)
        cache.put_many({k: g.texts[0].strip() for (k, _), g in zip(chunk, output.generations)})
        if progress:
            progress(len(chunk))
    return [str(cache.get(k)) for k in keys]


def answer_margins(embedder: Any, answers: Sequence[str], preferred: Sequence[str], rejected: Sequence[str]) -> list[float]:
    """cos(answer, preferred) - cos(answer, rejected) in MiniLM, per answer (an empty answer scores 0)."""
    if not answers:
        return []
    good = embedder.cosine(list(answers), list(preferred))
    bad = embedder.cosine(list(answers), list(rejected))
    return [0.0 if not a.strip() else g - b for a, g, b in zip(answers, good, bad)]


def win_tie_loss(scores: Sequence[float], raw: Sequence[float], band: float) -> dict[str, Any]:
    """Wins, ties and losses of ``scores`` against the raw prompt's, with ``band`` as the tie band."""
    deltas = [s - r for s, r in zip(scores, raw)]
    wins = sum(d > band for d in deltas)
    losses = sum(d < -band for d in deltas)
    return {"win": wins, "tie": len(deltas) - wins - losses, "loss": losses, "net": wins - losses,
            "mean": round(statistics.fmean(scores), 4) if scores else None,
            "mean_delta": round(statistics.fmean(deltas), 4) if deltas else None}
