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

from bpo_plugins.chat import content_text, last_user_index
from bpo_plugins.embeddings import MINILM, TextEmbedder, shared_embedder

ARTIFACT_VERSION = 1


@dataclass(frozen=True)
class PromptFormat:
    """How the prompt, the examples and the user's query are laid out for the base model."""

    name: str
    #: The system message: ``{prompt}`` then ``{examples}`` (each example rendered with ``example``).
    system: str
    example: str
    user: str
    start: str = "<START>"
    end: str = "<END>"
    stop: tuple[str, ...] = ("<END>", "<END", "<|eot_id|>")
    #: True: the whole input is one raw string (no chat template), as DRPO's search ran local models
    #: and as ``auto_model.py`` serves a base model.
    raw: bool = False
    #: In a raw input, the text between the system part (prompt and examples) and the user turn.
    joiner: str = ""
    #: The first example's layout where it differs from the others' (DRPO's search format); "" = ``example``.
    first_example: str = ""

    def render_example(self, example: Example, template: str | None = None) -> str:
        template = self.example if template is None else template
        return template.replace("{query}", example.query).replace("{answer}", f"{self.start}\n{example.answer}\n{self.end}")

    def render_system(self, prompt: str, examples: Sequence[Example]) -> str:
        rendered = "".join(self.render_example(e, self.first_example if i == 0 and self.first_example else None)
                           for i, e in enumerate(examples))
        return self.system.replace("{prompt}", prompt).replace("{examples}", rendered)

    def render_user(self, query: str) -> str:
        return self.user.replace("{query}", query).replace("{start}", self.start)

    def render_raw(self, system: str, query: str) -> str:
        """The whole raw input: the rendered system part, then the user turn."""
        return system + self.joiner + self.render_user(query)


#: DRPO's inference format (``auto_model.py``): what its published prompts are served with.
#: As one text (:meth:`Alignment.render`; a model without a chat template), the system part and the
#: user turn are joined by a blank line, as ``auto_model.py`` joins them.
CHAT_FORMAT = PromptFormat(
    name="chat", system="{prompt}{examples}", example="\n\n#Query:\n{query}\n\n#Answer:\n{answer}",
    user="# Query:\n{query}\n\n# Answer:\n{start}", joiner="\n\n",
)
#: DRPO's search format (``world_model.py``), also the raw, no-chat-template layout for local models:
#: ``# instructions``, the prompt, the examples (the first headed ``# Query:``, the others ``#Query:``,
#: as its code writes them), then the user turn.
RAW_FORMAT = PromptFormat(
    name="raw", system="# instructions\n\n{prompt}\n\n{examples}", example="\n\n#Query:\n{query}\n\n#Answer:\n{answer}",
    user="# Query:\n{query}\n\n# Answer:\n{start}", raw=True, joiner="\n\n", first_example="# Query:\n{query}\n\n#Answer:\n{answer}",
)
#: DRPO's search layout for an API (chat) model (``world_model.py``'s ``is_GPT`` branch): the raw
#: format's system part, ``\n\n`` included, as the system message; the ``# Query:`` turn as the user message.
SEARCH_FORMAT = PromptFormat(
    name="search", system="# instructions\n\n{prompt}\n\n{examples}\n\n", example="\n\n#Query:\n{query}\n\n#Answer:\n{answer}",
    user="# Query:\n{query}\n\n# Answer:\n{start}", first_example="# Query:\n{query}\n\n#Answer:\n{answer}",
)
#: DRPO's inference layout for a base model (``auto_model.py`` when the tokenizer has no chat
#: template): the chat format's system part and user turn as one text, joined by a blank line;
#: generation stops at ``<END>``. The published base-model presets are served this way.
BASE_FORMAT = PromptFormat(
    name="base", system="{prompt}{examples}", example="\n\n#Query:\n{query}\n\n#Answer:\n{answer}",
    user="# Query:\n{query}\n\n# Answer:\n{start}", raw=True, joiner="\n\n",
)
FORMATS = {f.name: f for f in (CHAT_FORMAT, RAW_FORMAT, BASE_FORMAT, SEARCH_FORMAT)}


@dataclass(frozen=True)
class Example:
    query: str
    #: The answer without DRPO's ``<START>`` / ``<END>`` markers (the format adds them).
    answer: str

    @classmethod
    def from_marked(cls, query: str, answer: str, fmt: PromptFormat = CHAT_FORMAT) -> Example:
        return cls(query, strip_markers(answer, fmt))


def strip_markers(text: str, fmt: PromptFormat = CHAT_FORMAT) -> str:
    """The answer between DRPO's markers (either may be missing: generation stops at ``<END>``)."""
    text = text.strip()
    if text.startswith(fmt.start):
        text = text[len(fmt.start):]
    for stop in fmt.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return text.strip()


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

    def apply_to_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat request aligned (messages as :meth:`apply`, DRPO's stop strings added), or
        for a raw format the completions request DRPO serves base models with. The core request
        rewriter does it: :func:`bpo_plugins.requests.rewrite_requests`."""
        from bpo_plugins.requests import Shape, rewrite_requests

        ((aligned, _),) = rewrite_requests([body], Shape.CHAT, None, alignment=self)
        return aligned

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

