"""The user's prompt inside an OpenAI-style message list: found, and replaced in place.

Shared by every edge that sees raw chat payloads (the gateway, the LiteLLM guardrail), so each
finds the prompt the same way and refuses the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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


def last_user_prompt(messages: Sequence[Any]) -> UserPrompt | str:
    """The last user message's text, or why there is none to rewrite (``no_user_message``,
    ``unsupported_content`` for content that is not one text: images with several text parts, say)."""
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        return "no_user_message"
    content = user.get("content")
    if isinstance(content, str):
        return UserPrompt(content, lambda text: user.__setitem__("content", text))
    parts = [p for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)] if isinstance(content, list) else []
    if len(parts) != 1:
        return "unsupported_content"
    return UserPrompt(parts[0]["text"], lambda text: parts[0].__setitem__("text", text))
