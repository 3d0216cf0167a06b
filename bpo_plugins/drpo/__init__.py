"""DRPO (Singla et al., EMNLP 2024): tuning-free alignment by a searched system prompt and examples.

``import bpo_plugins.drpo`` loads no model. DRPO's published results ship as presets that need no
call at all::

    from bpo_plugins.drpo import load_alignment
    aligned = load_alignment("llama3-8b-instruct")          # or a path to a searched artifact
    messages = aligned.apply([{"role": "user", "content": "How do I bake bread?"}])

Presets, examples and the metrics cache are DRPO's (github Singla17/dynamic-alignment-optimization,
Apache-2.0; see ``data/NOTICE``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.alignment import (
    CHAT_FORMAT,
    FORMATS,
    RAW_FORMAT,
    Alignment,
    Example,
    ExampleRetriever,
    PromptFormat,
)

__all__ = [
    "CHAT_FORMAT", "FORMATS", "PRESETS", "RAW_FORMAT", "Alignment", "Example", "ExampleRetriever", "PromptFormat",
    "icl_examples", "load_alignment", "load_preset", "metrics_cache",
]

#: DRPO's published system prompts, by the base model they were searched for.
PRESETS: dict[str, str] = {
    "gpt-3.5-turbo": "gpt-3.5-turbo.txt",
    "llama2-7b-chat": "llama2-7b-chat-hf.txt",
    "llama3-8b-instruct": "llama3-8b-instruct.txt",
    "mistral-7b-instruct": "mistral-7b-instruct-v0.1.txt",
}
SOURCE = "github.com/Singla17/dynamic-alignment-optimization (Apache-2.0)"


def _data(name: str) -> Any:
    return resources.files("bpo_plugins.drpo").joinpath("data", name)


@lru_cache(maxsize=1)
def icl_examples() -> tuple[Example, ...]:
    """DRPO's 16 optimized in-context examples (``ICL_examples.json``)."""
    raw: dict[str, str] = json.loads(_data("icl_examples.json").read_text(encoding="utf-8"))
    return tuple(Example.from_marked(query, answer) for query, answer in raw.items())


@lru_cache(maxsize=1)
def metrics_cache() -> dict[str, Any]:
    """DRPO's cached per-query aspect choices (``metrics_cache.json``): query -> analysis and aspects."""
    return json.loads(_data("metrics_cache.json").read_text(encoding="utf-8"))


def load_preset(name: str, *, k: int = 3) -> Alignment:
    """A published DRPO alignment: its system prompt for ``name``, its 16 examples, k retrieved per query."""
    if name not in PRESETS:
        raise ValueError(f"unknown DRPO preset {name!r}: use one of {', '.join(PRESETS)} or a path to an artifact")
    prompt = _data("presets/" + PRESETS[name]).read_text(encoding="utf-8").strip()
    return Alignment(prompt, icl_examples(), k=k, format=CHAT_FORMAT,
                     provenance={"source": SOURCE, "preset": name, "base_model": name})


def load_alignment(name_or_path: str | Path, *, k: int | None = None) -> Alignment:
    """A preset name, or the path of an artifact JSON written by a search or :meth:`Alignment.save`."""
    if str(name_or_path) in PRESETS:
        return load_preset(str(name_or_path), k=3 if k is None else k)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"no DRPO preset or artifact {str(name_or_path)!r}: presets are {', '.join(PRESETS)}")
    alignment = Alignment.load(path)
    return alignment if k is None else replace(alignment, k=k)
