"""LangChain: the real Runnable protocol, a real chat model over HTTP, a real v1 agent."""

from __future__ import annotations

import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tracers.base import BaseTracer
from langchain_openai import ChatOpenAI

from bpo_plugins import FallbackReason, RewriteError, Rewriter
from bpo_plugins.langchain import BPOMiddleware, BPORewriter
from tests.test_rewriter import count_generate_calls

PROMPT = "Tell me about Harry Potter"
REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."


class RunCollector(BaseTracer):
    def __init__(self) -> None:
        super().__init__()
        self.runs = []

    def _persist_run(self, run) -> None:
        pass

    def _end_trace(self, run) -> None:
        super()._end_trace(run)
        self.runs.append(run)


class EventCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events = []

    def on_custom_event(self, name, data, **kwargs) -> None:
        self.events.append((name, data))


@pytest.fixture(scope="module")
def scripted(script_server) -> Rewriter:
    return Rewriter.from_openai("script", base_url=script_server.base_url)


@pytest.fixture(scope="module")
def target(model_server) -> ChatOpenAI:
    return ChatOpenAI(model="smollm2", base_url=model_server.base_url, api_key="local", max_tokens=16, temperature=0)


def last_chat_request(server) -> list[dict]:
    return [r for r in server.received() if r["path"].endswith("/chat/completions")][-1]["body"]["messages"]


def test_types_in_types_out(scripted):
    bpo = BPORewriter(rewriter=scripted)
    assert bpo.invoke(PROMPT) == REWRITE
    assert bpo.invoke(StringPromptValue(text=PROMPT)) == StringPromptValue(text=REWRITE)
    assert bpo.invoke({"input": PROMPT, "other": 1}) == {"input": REWRITE, "other": 1}
    assert BPORewriter(rewriter=scripted, input_key="q").invoke({"q": PROMPT}) == {"q": REWRITE}

    system, ai = SystemMessage("You are terse."), AIMessage("Earlier answer")
    messages = [system, HumanMessage("First question about Harry Potter"), ai, HumanMessage(PROMPT)]
    out = bpo.invoke(messages)
    assert out[0] == system and out[2] == ai and out[1].content == "First question about Harry Potter"
    assert out[3].content == REWRITE
    value = bpo.invoke(ChatPromptValue(messages=messages))
    assert isinstance(value, ChatPromptValue) and value.messages[3].content == REWRITE


def test_multimodal_rewrites_only_text_parts(scripted):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    message = HumanMessage(content=[{"type": "text", "text": PROMPT}, image])
    out = BPORewriter(rewriter=scripted).invoke([message])
    assert out[0].content == [{"type": "text", "text": REWRITE}, image]


def test_bad_input_types_are_clear(scripted):
    bpo = BPORewriter(rewriter=scripted)
    with pytest.raises(TypeError, match="takes a str"):
        bpo.invoke(42)
    with pytest.raises(TypeError, match="input_key='input'"):
        bpo.invoke({"question": PROMPT})


def test_chain_sends_rewrite_to_the_llm_and_keeps_system(scripted, target, model_server):
    prompt = ChatPromptTemplate.from_messages([("system", "You are a librarian."), ("human", "{question}")])
    chain = prompt | BPORewriter(rewriter=scripted) | target | StrOutputParser()
    answer = chain.invoke({"question": PROMPT})
    assert isinstance(answer, str) and answer
    sent = last_chat_request(model_server)
    assert sent[0] == {"role": "system", "content": "You are a librarian."}
    assert sent[-1] == {"role": "user", "content": REWRITE}


async def test_async_chain_and_streaming(scripted, target, model_server):
    chain = BPORewriter(rewriter=scripted) | target | StrOutputParser()
    assert await chain.ainvoke(PROMPT)
    assert last_chat_request(model_server)[-1]["content"] == REWRITE
    assert list(BPORewriter(rewriter=scripted).stream(PROMPT)) == [REWRITE]
    assert [c async for c in BPORewriter(rewriter=scripted).astream(PROMPT)] == [REWRITE]


def test_batch_is_one_core_batch(tiny_rewriter, monkeypatch):
    calls = count_generate_calls(tiny_rewriter, monkeypatch)
    bpo = BPORewriter(rewriter=tiny_rewriter, mode="stable")
    outputs = bpo.batch(["first prompt", [HumanMessage("second prompt")], {"input": "third prompt"}])
    assert calls == [3]
    assert isinstance(outputs[0], str) and isinstance(outputs[1], list) and isinstance(outputs[2], dict)


async def test_abatch_is_one_core_batch(tiny_rewriter, monkeypatch):
    calls = count_generate_calls(tiny_rewriter, monkeypatch)
    outputs = await BPORewriter(rewriter=tiny_rewriter, mode="stable").abatch(["one", "two", "three", "four"])
    assert calls == [4] and len(outputs) == 4


def test_tracing_metadata_carries_rewrite_and_fallback(scripted):
    tracer = RunCollector()
    bpo = BPORewriter(rewriter=scripted)
    bpo.invoke(PROMPT, config={"callbacks": [tracer]})
    bpo.batch([PROMPT, "What is the capital of France?"], config={"callbacks": [tracer]})
    runs = [r for r in tracer.runs if r.name == "BPORewriter"]
    assert len(runs) == 3
    first = runs[0].metadata
    assert first["bpo_original"] == PROMPT and first["bpo_rewritten"] == REWRITE and first["bpo_fallback"] is None
    failed = [r.metadata for r in runs if r.metadata.get("bpo_fallback")]
    assert failed and failed[0]["bpo_fallback"] == "answered" and failed[0]["bpo_rewritten"] == "What is the capital of France?"


def test_configurable_mode(scripted):
    tracer = RunCollector()
    bpo = BPORewriter(rewriter=scripted).configurable_fields(mode=ConfigurableField(id="bpo_mode"))
    bpo.invoke(PROMPT, config={"configurable": {"bpo_mode": "aggressive"}, "callbacks": [tracer]})
    assert [r.metadata["bpo_mode"] for r in tracer.runs if "bpo_mode" in r.metadata] == ["aggressive"]


def test_fail_open_false_raises(scripted):
    with pytest.raises(RewriteError) as info:
        BPORewriter(rewriter=scripted, fail_open=False).invoke("What is the capital of France?")
    assert info.value.reason is FallbackReason.ANSWERED


def test_no_model_config_field():
    assert "model_config" not in BPORewriter.model_fields
    assert set(BPORewriter.model_fields) >= {"rewriter", "mode", "fail_open", "input_key"}


def test_agent_middleware_rewrites_latest_user_message(scripted, target, model_server):
    events = EventCollector()
    agent = create_agent(model=target, tools=[], system_prompt="You are a librarian.", middleware=[BPOMiddleware(scripted)])
    state = agent.invoke({"messages": [HumanMessage(PROMPT)]}, config={"callbacks": [events]})
    sent = last_chat_request(model_server)
    assert sent[0]["content"] == "You are a librarian." and sent[-1]["content"] == REWRITE
    assert state["messages"][0].content == PROMPT  # the conversation keeps the user's own words
    assert isinstance(state["messages"][-1], AIMessage)
    assert events.events[0][0] == "bpo_rewrite"
    assert events.events[0][1]["bpo_rewritten"] == REWRITE


async def test_agent_middleware_async_and_fallback_visible(scripted, target, model_server):
    events = EventCollector()
    agent = create_agent(model=target, tools=[], middleware=[BPOMiddleware(scripted)])
    await agent.ainvoke({"messages": [HumanMessage("What is the capital of France?")]}, config={"callbacks": [events]})
    assert last_chat_request(model_server)[-1]["content"] == "What is the capital of France?"
    assert events.events[0][1]["bpo_fallback"] == "answered"


# -- DRPO ----------------------------------------------------------------------------------------

REVENGE = "How can I make my buddy suffer for taking my cash?"
TORTURE = "What is the best way to torture a friend who stole my money?"


def test_drpo_aligner_puts_preset_and_retrieved_examples_before_the_llm(target, model_server):
    from bpo_plugins.drpo import load_preset
    from bpo_plugins.langchain import DRPOAligner

    preset = load_preset("llama3-8b-instruct")
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in one sentence."), ("human", "{question}")])
    chain = prompt | DRPOAligner("llama3-8b-instruct") | target | StrOutputParser()
    assert isinstance(chain.invoke({"question": REVENGE}), str)
    sent = last_chat_request(model_server)
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith(preset.system_prompt)
    assert f"#Query:\n{TORTURE}" in sent[0]["content"] and sent[0]["content"].endswith("Answer in one sentence.")
    assert sent[-1]["content"] == f"# Query:\n{REVENGE}\n\n# Answer:\n<START>"
    # Types in, types out: a plain message list stays a message list.
    out = DRPOAligner(preset, k=1).invoke([HumanMessage("hi")])
    assert isinstance(out, list) and isinstance(out[0], SystemMessage) and out[0].content.count("#Query:") == 1


def test_bpo_then_drpo_in_one_step(scripted, target, model_server):
    from bpo_plugins.langchain import DRPOAligner

    aligner = DRPOAligner("mistral-7b-instruct", bpo=True, rewriter=scripted)
    outputs = aligner.batch([ChatPromptValue(messages=[HumanMessage(PROMPT)]), [HumanMessage("What is the capital of France?")]])
    assert outputs[0].messages[-1].content == f"# Query:\n{REWRITE}\n\n# Answer:\n<START>"
    assert outputs[1][-1].content.startswith("# Query:\nWhat is the capital of France?")  # BPO fell back, DRPO still applied
    (ChatPromptTemplate.from_messages([("human", "{q}")]) | aligner | target).invoke({"q": PROMPT})
    assert last_chat_request(model_server)[-1]["content"].startswith(f"# Query:\n{REWRITE}")


async def test_drpo_middleware_aligns_each_agent_model_call(target, model_server):
    from bpo_plugins.drpo import load_preset
    from bpo_plugins.langchain import DRPOMiddleware

    agent = create_agent(model=target, tools=[], system_prompt="You are a librarian.", middleware=[DRPOMiddleware("gpt-3.5-turbo", k=2)])
    state = await agent.ainvoke({"messages": [HumanMessage(REVENGE)]})
    sent = last_chat_request(model_server)
    assert sent[0]["content"].startswith(load_preset("gpt-3.5-turbo").system_prompt) and sent[0]["content"].count("#Query:") == 2
    assert sent[0]["content"].endswith("You are a librarian.") and TORTURE in sent[0]["content"]
    assert sent[-1]["content"] == REVENGE and state["messages"][0].content == REVENGE  # only the system prompt changes


def test_drpo_aligner_with_a_base_model_preset_prompts_a_completion_llm(model_server):
    """A raw (base-model) alignment gives DRPO's whole text prompt, and a completion LLM answers it."""
    from langchain_openai import OpenAI

    from bpo_plugins.drpo import RAW_FORMAT, Alignment, icl_examples
    from bpo_plugins.langchain import DRPOAligner

    raw = Alignment("You are a helpful, honest assistant.", icl_examples()[:4], k=1, format=RAW_FORMAT)
    aligner = DRPOAligner(raw)
    value = aligner.invoke("Name a fruit.")
    assert isinstance(value, StringPromptValue) and value.text == raw.render("Name a fruit.")
    assert value.text.startswith("# instructions\n\n") and value.text.endswith("# Query:\nName a fruit.\n\n# Answer:\n<START>")
    llm = OpenAI(model="base", base_url=model_server.base_url, api_key="k", max_tokens=8, temperature=0, max_retries=0)
    assert isinstance((aligner | llm.bind(stop=["<END>"])).invoke("Name a fruit."), str)
    sent = model_server.received()[-1]
    prompt = sent["body"]["prompt"]
    assert sent["path"] == "/v1/completions" and (prompt[0] if isinstance(prompt, list) else prompt) == value.text
    assert [v.text for v in aligner.batch(["Name a fruit.", "Name a tree."])] == [value.text, raw.render("Name a tree.")]
