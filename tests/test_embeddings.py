"""MiniLM on onnxruntime (bpo_plugins.embeddings) against sentence-transformers on the same weights: the same
vectors, so the same DRPO neighbours and the same intent-guard cosines as before the move off torch."""

from __future__ import annotations

import numpy as np
import pytest

from bpo_plugins.drpo import icl_examples, load_preset
from bpo_plugins.drpo.alignment import ExampleRetriever
from bpo_plugins.embeddings import MINILM, Embedder, minilm_folder

sentence_transformers = pytest.importorskip("sentence_transformers")

QUERIES = [
    "Tell me about Harry Potter",
    "How do I sort a list of dictionaries by a key in Python?",
    "What are the health benefits of green tea?",
    "Write a short poem about autumn leaves.",
    "Explain the difference between a virus and a bacterium.",
    "My landlord won't return my deposit, what can I do?",
    "Give me a recipe for vegan pancakes",
    "Translate 'good morning' into French, Spanish and German.",
    "",  # an empty prompt still embeds (the [CLS] [SEP] pair), as it does in sentence-transformers
]


class _SentenceTransformersMiniLM:
    """The reference: sentence-transformers' own pipeline (tokenize, BERT, mean pooling, normalize)."""

    name = MINILM

    def __init__(self) -> None:
        self.model = sentence_transformers.SentenceTransformer(str(minilm_folder()), device="cpu")

    def encode(self, texts):
        return self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="module")
def reference() -> _SentenceTransformersMiniLM:
    return _SentenceTransformersMiniLM()


def test_vectors_match_sentence_transformers(reference):
    long_prompt = "Please summarise the following report. " * 80  # past the 256-token limit: truncated alike
    texts = [*QUERIES, long_prompt]
    ours, theirs = Embedder().encode(texts), reference.encode(texts)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_drpo_neighbours_match_sentence_transformers(reference):
    examples = icl_examples()
    ours, theirs = ExampleRetriever(examples, Embedder()), ExampleRetriever(examples, reference)
    for query in QUERIES:
        assert [e.query for e in ours.top(query, 3)] == [e.query for e in theirs.top(query, 3)], query


def test_intent_cosines_match_sentence_transformers(reference):
    originals = QUERIES[:-1]
    rewrites = [q.upper() + " Be detailed." for q in originals]
    ours = Embedder().cosine(originals, rewrites)
    theirs = (reference.encode(originals) * reference.encode(rewrites)).sum(axis=1)
    assert np.allclose(ours, theirs, atol=1e-5)


def test_preset_retrieval_runs_on_the_onnx_embedder():
    alignment = load_preset("llama3-8b-instruct")
    system = alignment.system_message("How do I learn to play the guitar?")
    assert system.startswith(alignment.system_prompt)
    assert system.count("#Query:") == 3
