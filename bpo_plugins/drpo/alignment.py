"""A DRPO alignment: an optimized system prompt plus a bank of in-context examples, as one JSON file.

At inference (DRPO's ``auto_model.py``) the system message is the optimized prompt followed by the k
examples whose queries are nearest the user's query; the user turn is wrapped as ``# Query:`` /
``# Answer:\\n<START>`` and generation stops at ``<END>``. The search (``world_model.py``) used a raw
format instead: both are kept as :class:`PromptFormat` values, and an artifact records the one it was
searched in, so it is served the same way.

An artifact is JSON, never a pickle: prompt, examples, retrieval settings, format and provenance.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bpo_plugins.chat import content_text, last_user_index, last_user_prompt
from bpo_plugins.drpo.formats import CHAT_FORMAT, Example, PromptFormat, strip_markers
from bpo_plugins.drpo.serving import align_body
from bpo_plugins.embeddings import MINILM, TextEmbedder, shared_embedder
from bpo_plugins.outcome import Shape

ARTIFACT_VERSION = 1


class ExampleRetriever:
    """The k examples whose queries are nearest a query (cosine of sentence embeddings).

    Example embeddings are computed once, on first use. DRPO used all-mpnet-base-v2; the bundled
    default is all-MiniLM-L6-v2, and any :class:`~bpo_plugins.embeddings.TextEmbedder` can stand in.
    """

    def __init__(self, examples: Sequence[Example], embedder: TextEmbedder | None = None) -> None:
        self.examples = list(examples)
        self.embedder = embedder
        self._matrix: Any = None
        self._lock = threading.Lock()

    def top(self, query: str, k: int) -> list[Example]:
        if k <= 0 or not self.examples:
            return []
        with self._lock:
            if self.embedder is None:
                self.embedder = shared_embedder()
            if self._matrix is None:
                self._matrix = self.embedder.encode([e.query for e in self.examples])
        scores = self._matrix @ self.embedder.encode([query])[0]
        order = sorted(range(len(self.examples)), key=lambda i: (-float(scores[i]), i))  # ties: bank order
        return [self.examples[i] for i in order[:k]]


@dataclass
class Alignment:
    """What DRPO produces and what every integration applies: prompt, examples, retrieval, format."""

    system_prompt: str
    examples: tuple[Example, ...] = ()
    k: int = 3
    embedder: str = MINILM
    format: PromptFormat = CHAT_FORMAT
    #: Where it came from: base model, judge, per-level scores, calls, tokens, cost, package version.
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.system_prompt, str) or not self.system_prompt.strip():
            raise ValueError("an alignment needs a non-empty system prompt")
        if not 0 <= self.k <= 5:
            raise ValueError(f"k must be between 0 and 5 (DRPO retrieves 1-5 examples), got {self.k}")
        self._retriever: ExampleRetriever | None = None

    # -- applying -----------------------------------------------------------------------------

    def use_embedder(self, embedder: TextEmbedder) -> Alignment:
        """The same alignment retrieving with another embedder (its name is recorded)."""
        aligned = replace(self, embedder=getattr(embedder, "name", type(embedder).__name__))
        aligned._retriever = ExampleRetriever(self.examples, embedder)
        return aligned

    def with_format(self, fmt: PromptFormat) -> Alignment:
        """The same alignment laid out in another format; it shares this one's retriever (and embeddings)."""
        if self._retriever is None:
            self._retriever = ExampleRetriever(self.examples)
        aligned = replace(self, format=fmt)
        aligned._retriever = self._retriever
        return aligned

    def retrieve(self, query: str, k: int | None = None) -> list[Example]:
        if self._retriever is None:
            self._retriever = ExampleRetriever(self.examples)
        return self._retriever.top(query, self.k if k is None else k)

    def system_message(self, query: str, k: int | None = None, *, keep: str | None = None) -> str:
        """The aligned system message for ``query``; ``keep``: the app's own system message, kept after it."""
        system = self.format.render_system(self.system_prompt, self.retrieve(query, k))
        return f"{system}\n\n{keep}".rstrip() if keep else system

    def apply(self, messages: Sequence[dict[str, Any]], k: int | None = None, *, query: str | None = None) -> list[dict[str, Any]]:
        """A chat conversation aligned: DRPO's system message first (an existing system message is
        kept after it), and the last user turn in DRPO's query format. Other turns are untouched.
        ``query``: the text to retrieve examples for, when not the last user turn itself (the
        user's own words before a BPO rewrite)."""
        messages = [dict(m) for m in messages]
        last_user = last_user_index(messages)  # the turn BPO rewrites: the same rule at every edge
        text = content_text(messages[last_user].get("content")) if last_user is not None else ""
        if last_user is not None and isinstance(messages[last_user].get("content"), str):
            messages[last_user]["content"] = self.format.render_user(text)
        retrieval = text if query is None else query
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = self.system_message(retrieval, k, keep=content_text(messages[0].get("content")))
            return messages
        return [{"role": "system", "content": self.system_message(retrieval, k)}, *messages]

    @property
    def is_raw(self) -> bool:
        """True for a base (pretrained-only) model's alignment: served as one raw text by
        :meth:`render`, generating until ``<END>``, not as chat messages."""
        return self.format.raw

    def render(self, query: str, k: int | None = None) -> str:
        """The raw format's whole input for one query (no chat template): prompt, the k nearest
        examples, and the ``# Query:`` ... ``<START>`` turn the model continues."""
        return self.format.render_raw(self.system_message(query, k), query)

    def align_request(self, body: dict[str, Any], shape: Shape, query: str | None) -> tuple[dict[str, Any], Shape] | None:
        """``body`` (a request of ``shape``) aligned by DRPO's request recipe, examples retrieved for
        ``query``, and the shape it now has; None when that shape has no place for instructions."""
        return align_body(body, shape, self, query)

    def apply_to_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat request aligned (messages as :meth:`apply`, DRPO's stop strings added), or
        for a raw format the completions request DRPO serves base models with."""
        messages = body.get("messages")
        prompt, _ = last_user_prompt(messages) if isinstance(messages, list) else (None, None)
        aligned = self.align_request(body, Shape.CHAT, prompt.text if prompt is not None else None)
        return dict(body) if aligned is None else aligned[0]

    def answer(self, text: str) -> str:
        """A base model's reply without DRPO's markers."""
        return strip_markers(text, self.format)

    # -- the JSON artifact ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        from bpo_plugins import __version__

        provenance = {"package_version": __version__, **self.provenance}
        return {
            "bpo_plugins_artifact": "drpo-alignment", "version": ARTIFACT_VERSION,
            "system_prompt": self.system_prompt,
            "examples": [asdict(e) for e in self.examples],
            "retrieval": {"embedder": self.embedder, "k": self.k},
            "format": {**asdict(self.format), "stop": list(self.format.stop)},
            "provenance": provenance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alignment:
        if data.get("bpo_plugins_artifact") != "drpo-alignment":
            raise ValueError("not a DRPO alignment artifact (no 'bpo_plugins_artifact': 'drpo-alignment')")
        if data.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"alignment artifact version {data.get('version')!r}; this package reads version {ARTIFACT_VERSION}")
        try:
            fmt = dict(data["format"])
            fmt["stop"] = tuple(fmt.get("stop", ()))
            return cls(
                system_prompt=data["system_prompt"],
                examples=tuple(Example(str(e["query"]), str(e["answer"])) for e in data.get("examples", [])),
                k=int(data["retrieval"]["k"]), embedder=str(data["retrieval"]["embedder"]),
                format=PromptFormat(**fmt), provenance=dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed alignment artifact: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)  # a crash mid-write never leaves a torn artifact
        return path

    @classmethod
    def load(cls, path: str | Path) -> Alignment:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an alignment artifact is a JSON object")
        return cls.from_dict(data)

