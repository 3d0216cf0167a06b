"""DRPO's request recipe: where an alignment goes in each API's request, and how a chat request for a
base model becomes the one completions request DRPO's ``auto_model.py`` serves base models with
(its rendered text, its stop strings, its decoding).

A chat request gets DRPO's system message, query format and stop strings; an Anthropic request gets
it in the top-level ``system`` field; a Responses or completions request has no system prompt to align.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bpo_plugins.chat import content_text, last_user_index
from bpo_plugins.drpo.formats import Example
from bpo_plugins.outcome import Shape

if TYPE_CHECKING:
    from bpo_plugins.drpo.alignment import Alignment

__all__ = ["align_body"]

#: How DRPO's ``auto_model.py`` samples answers: temperature 0.7, top_p 0.95, 512 new tokens.
_DRPO_DECODING = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512}
#: Chat request fields a completions request takes as they are.
_COMPLETION_FIELDS = ("model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "seed",
                      "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs")


def align_body(body: dict[str, Any], shape: Shape, alignment: Alignment, query: str | None) -> tuple[dict[str, Any], Shape] | None:
    """``body`` with ``alignment`` applied (examples retrieved for ``query``, the user's own words)
    and the shape it now has; None when ``shape`` has no place for instructions."""
    if shape == Shape.CHAT and alignment.format.raw:
        return _raw_completion(body, alignment, query), Shape.COMPLETIONS
    if shape == Shape.CHAT:
        body = dict(body)
        body["messages"] = alignment.apply(body.get("messages") or [], query=query)
        body["stop"] = _stops(body, alignment)
        return body, shape
    if shape == Shape.MESSAGES:
        body = dict(body)
        own = body.get("system")
        if isinstance(own, list):  # blocks stay blocks (cache_control and all); DRPO's message goes first
            body["system"] = [{"type": "text", "text": alignment.system_message(query or "")}, *own]
        else:
            body["system"] = alignment.system_message(query or "", keep=own if isinstance(own, str) and own else None)
        return body, shape
    return None  # a Responses or completions request has no system prompt to align


def _raw_completion(body: dict[str, Any], alignment: Alignment, query: str | None) -> dict[str, Any]:
    """A chat request for a base model as one completions request: DRPO's prompt, the retrieved
    examples, earlier turns as answered queries, then the last user turn, generated to ``<END>``."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    last = last_user_index(messages)  # the turn BPO rewrites: the same rule at every edge
    text = content_text(messages[last].get("content")) if last is not None else ""
    turns = [(m.get("role"), content_text(m.get("content"))) for m in messages[: last or 0] if m.get("role") in ("user", "assistant")]
    history = [Example(q, a) for (r1, q), (r2, a) in zip(turns, turns[1:]) if r1 == "user" and r2 == "assistant"]
    fmt = alignment.format
    # The app's own system text follows DRPO's prompt and examples, as Alignment.apply keeps it in chat.
    own = "\n\n".join(content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    system = alignment.system_message(query if query is not None else text, keep=own or None)
    prompt = fmt.render_raw(system + "".join(fmt.render_example(e) for e in history), text)
    # DRPO's inference defaults (auto_model.py) where the client set none: a completions server's own
    # default length (16 tokens on OpenAI-compatible servers) would cut every answer short.
    request = {**_DRPO_DECODING, **{k: body[k] for k in _COMPLETION_FIELDS if k in body}}
    if "max_completion_tokens" in body and "max_tokens" not in body:
        request["max_tokens"] = body["max_completion_tokens"]
    request["prompt"] = prompt
    request["stop"] = _stops(body, alignment)
    return request


def _stops(body: dict[str, Any], alignment: Alignment) -> list[str]:
    """DRPO's stop strings first (an answer ends at ``<END>``), then the client's, four at most (OpenAI's limit)."""
    own = body.get("stop")
    own = [own] if isinstance(own, str) else list(own or [])
    return list(dict.fromkeys([*alignment.format.stop, *own]))[:4]
