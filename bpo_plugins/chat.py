"""The user's prompt inside a message list (OpenAI chat, Responses items, Anthropic Messages):
found, and replaced in place.

:mod:`bpo_plugins.request_rewriter` reads every request shape through this module, so each edge finds the
prompt the same way and refuses the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["UserPrompt", "content_text", "last_user_index", "last_user_prompt"]

#: Content part types that carry the user's text: chat ``text``, Responses ``input_text``; Anthropic ``text``.
_TEXT_PARTS = ("text", "input_text")


def content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content list (chat and Responses shapes)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


@dataclass
class UserPrompt:
    """The text of the last user message, and how to put a rewrite back where it came from."""

    text: str
    replace: Callable[[str], None]


def _tool_results_only(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and bool(content) and all(
        isinstance(p, dict) and p.get("type") == "tool_result" for p in content)


def last_user_index(messages: Sequence[Any]) -> int | None:
    """Where the prompt is: the last user message that is more than tool results (see :func:`last_user_prompt`)."""
    return next((i for i in range(len(messages) - 1, -1, -1)
                 if isinstance(messages[i], dict) and messages[i].get("role") == "user" and not _tool_results_only(messages[i])), None)


def last_user_prompt(messages: Sequence[Any]) -> tuple[UserPrompt | None, str | None]:
    """The last user message's text, or None and why there is none to rewrite.

    A user turn that only returns tool results (Anthropic's agent loop) is not the prompt: the
    prompt is the user turn before it, as in OpenAI's shape, where tool results are turns of their
    own. So every call of a tool loop sends the same (cached) rewrite.

    Reasons: ``no_user_message``; ``no_text`` (the user turn holds only images or other blocks);
    ``unsupported_content`` (several text parts: which one is the prompt is a guess).
    """
    index = last_user_index(messages)
    if index is None:
        return None, "no_user_message"
    user = messages[index]
    content = user.get("content")
    if isinstance(content, str):
        return UserPrompt(content, lambda text: user.__setitem__("content", text)), None
    if not isinstance(content, list):
        return None, "unsupported_content"
    parts = [p for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
             and p.get("type", "text") in _TEXT_PARTS]
    if not parts:
        return None, "no_text"
    if len(parts) != 1:
        return None, "unsupported_content"
    return UserPrompt(parts[0]["text"], lambda text: parts[0].__setitem__("text", text)), None
