"""DRPO's layouts: how a prompt, its examples and the user's query are laid out (:class:`PromptFormat`),
the four layouts DRPO's code uses, and an :class:`Example` with DRPO's ``<START>``/``<END>`` markers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BASE_FORMAT", "CHAT_FORMAT", "FORMATS", "RAW_FORMAT", "SEARCH_FORMAT", "Example", "PromptFormat", "strip_markers"]


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
