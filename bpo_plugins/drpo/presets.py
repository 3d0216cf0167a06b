"""DRPO's published results: its nine searched system prompts (presets), its 16 in-context examples,
its metrics cache and its hub-id mapping, and loading an alignment by preset name or artifact path.

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

from bpo_plugins.drpo.alignment import Alignment
from bpo_plugins.drpo.formats import BASE_FORMAT, CHAT_FORMAT, Example

__all__ = ["BASE_PRESETS", "PRESETS", "icl_examples", "load_alignment", "load_preset", "metrics_cache", "model_mapping", "preset_for"]

#: DRPO's nine published system prompts (``data/<model>/output.txt``), by the model they were
#: searched for; the file names are DRPO's folder names, which are also accepted as preset names.
PRESETS: dict[str, str] = {
    "gpt-3.5-turbo": "gpt-3.5-turbo.txt",
    "llama2-7b-chat": "llama2-7b-chat-hf.txt",
    "llama2-70b-chat": "llama2-70b-chat.txt",
    "llama3-8b-instruct": "llama3-8b-instruct.txt",
    "mistral-7b-instruct": "mistral-7b-instruct-v0.1.txt",
    "llama2-7b": "llama2-7b.txt",
    "llama2-70b": "llama2-70b.txt",
    "llama3-8b": "llama3-8b.txt",
    "mistral-7b-v0.1": "mistral-7b-v0.1.txt",
}
#: The presets searched for a base (pretrained-only) model: served as raw text (:data:`BASE_FORMAT`).
BASE_PRESETS = frozenset({"llama2-7b", "llama2-70b", "llama3-8b", "mistral-7b-v0.1"})
_FILE_PRESETS = {file.removesuffix(".txt"): name for name, file in PRESETS.items()}
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


@lru_cache(maxsize=1)
def model_mapping() -> dict[str, str]:
    """DRPO's ``model_mapping.json``: hub model id -> the path of its published prompt."""
    return json.loads(_data("presets/model_mapping.json").read_text(encoding="utf-8"))


def preset_for(name: str) -> str | None:
    """The preset name for a preset name, a DRPO folder name (``llama2-7b-chat-hf``) or a hub id in
    DRPO's mapping (``meta-llama/Meta-Llama-3-8B``, matched case-insensitively); None if none."""
    if name in PRESETS:
        return name
    if name in _FILE_PRESETS:
        return _FILE_PRESETS[name]
    mapping = {hub.lower(): path for hub, path in model_mapping().items()}
    path = mapping.get(name.lower())
    if path is None:
        return None
    # "./data/<folder>/output.pkl"; DRPO's file spells one folder "llama 2-7b" (its folder is llama2-7b).
    folder = Path(path).parent.name.replace(" ", "")
    return _FILE_PRESETS.get(folder)


def load_preset(name: str, *, k: int = 3) -> Alignment:
    """A published DRPO alignment: its system prompt for ``name`` (a preset, DRPO folder or hub id),
    its 16 examples, k retrieved per query. A base model's preset is raw (:attr:`Alignment.is_raw`)."""
    preset = preset_for(name)
    if preset is None:
        raise ValueError(f"unknown DRPO preset {name!r}: use one of {', '.join(PRESETS)}, a hub id in DRPO's "
                         "model_mapping.json, or a path to an artifact")
    prompt = _data("presets/" + PRESETS[preset]).read_text(encoding="utf-8")
    raw = preset in BASE_PRESETS
    return Alignment(prompt, icl_examples(), k=k, format=BASE_FORMAT if raw else CHAT_FORMAT,
                     provenance={"source": SOURCE, "preset": preset, "base_model": preset, "raw": raw})


def load_alignment(name_or_path: str | Path, *, k: int | None = None) -> Alignment:
    """A preset name, a hub id in DRPO's mapping, or the path of an artifact JSON written by a
    search or :meth:`Alignment.save`."""
    if isinstance(name_or_path, str) and preset_for(name_or_path) is not None:
        return load_preset(name_or_path, k=3 if k is None else k)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"no DRPO preset or artifact {str(name_or_path)!r}: presets are {', '.join(PRESETS)}")
    alignment = Alignment.load(path)
    return alignment if k is None else replace(alignment, k=k)
