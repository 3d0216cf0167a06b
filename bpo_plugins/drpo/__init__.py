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

from bpo_plugins.drpo.alignment import Alignment, ExampleRetriever
from bpo_plugins.drpo.formats import BASE_FORMAT, CHAT_FORMAT, FORMATS, RAW_FORMAT, SEARCH_FORMAT, Example, PromptFormat
from bpo_plugins.drpo.pipeline import Aligned, AlignmentPipeline
from bpo_plugins.drpo.presets import (
    BASE_PRESETS,
    PRESETS,
    icl_examples,
    load_alignment,
    load_preset,
    metrics_cache,
    model_mapping,
    preset_for,
)

__all__ = [
    "BASE_FORMAT", "BASE_PRESETS", "CHAT_FORMAT", "FORMATS", "PRESETS", "RAW_FORMAT", "SEARCH_FORMAT", "Aligned", "Alignment", "AlignmentPipeline", "Example",
    "ExampleRetriever", "PromptFormat", "icl_examples", "load_alignment", "load_preset", "metrics_cache", "model_mapping", "preset_for",
]
