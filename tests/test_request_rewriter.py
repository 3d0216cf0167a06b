"""The one request rewriter (bpo_plugins.request_rewriter) on every request shape, against a real optimizer
server process with scripted rewrites; and a raw (base-model) DRPO preset served through the gateway."""

from __future__ import annotations

import copy
import json

import httpx
import pytest

from bpo_plugins import Rewriter
from bpo_plugins.drpo import RAW_FORMAT, Alignment, icl_examples, load_preset
from bpo_plugins.request_rewriter import RequestRewriter, Shape, find_prompt, rewrite_requests
from tests.conftest import Server, start_cli_server

PROMPT = "Tell me about Harry Potter"
REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.fixture(scope="module")
def requests_rewriter(script_server: Server) -> RequestRewriter:
    return RequestRewriter(Rewriter.from_openai("script", base_url=script_server.base_url), timeout_s=2.0)


def _chat(*messages: dict) -> dict:
    return {"model": "m", "messages": list(messages)}


async def test_chat_rewrites_only_the_last_user_message_and_never_mutates_the_caller(requests_rewriter):
    body = _chat({"role": "system", "content": "Be brief."}, {"role": "user", "content": "earlier"},
                 {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": PROMPT}, IMAGE]})
    before = copy.deepcopy(body)
    new, outcome = await requests_rewriter.arewrite(body, Shape.CHAT)
    assert body == before  # the caller's request is untouched
    assert outcome.status == "applied" and outcome.header == "applied" and outcome.result.original == PROMPT
    assert new["messages"][:3] == before["messages"][:3] and new["messages"][3]["content"] == [{"type": "text", "text": REWRITE}, IMAGE]
    assert outcome.cache == "miss" and outcome.rewrite_s > 0
    _, again = await requests_rewriter.arewrite(body, Shape.CHAT)
    assert again.cache == "hit"  # greedy rewrites are cached


@pytest.mark.parametrize(("shape", "body", "path"), [
    (Shape.RESPONSES, {"model": "m", "input": PROMPT}, ("input",)),
    (Shape.RESPONSES, {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]},
     ("input", 0, "content", 0, "text")),
    (Shape.COMPLETIONS, {"model": "m", "prompt": PROMPT}, ("prompt",)),
    (Shape.MESSAGES, {"model": "claude", "max_tokens": 9, "messages": [{"role": "user", "content": PROMPT}]}, ("messages", 0, "content")),
])
async def test_each_shape_finds_and_replaces_its_prompt(requests_rewriter, shape, body, path):
    new, outcome = await requests_rewriter.arewrite(body, shape)
    value = new
    for key in path:
        value = value[key]
    assert outcome.status == "applied" and value == REWRITE


async def test_anthropic_blocks_stay_byte_for_byte_and_a_tool_loop_is_not_rewritten_again(requests_rewriter):
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}}
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "earlier question"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}, tool_use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "result"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                                     {"type": "text", "text": PROMPT, "cache_control": {"type": "ephemeral"}}]},
    ]
    body = {"model": "claude", "max_tokens": 9, "system": [{"type": "text", "text": "Own system."}], "messages": turns}
    new, outcome = await requests_rewriter.arewrite(body, Shape.MESSAGES)
    assert outcome.status == "applied" and new["messages"][:2] == turns[:2]
    last = new["messages"][2]["content"]
    assert last[:2] == turns[2]["content"][:2] and last[2] == {"type": "text", "text": REWRITE, "cache_control": {"type": "ephemeral"}}
    # An agent's tool loop: the user turn that only returns tool results is not the prompt; the turn
    # before it is, so every call of the loop sends the same (cached) rewrite, as in OpenAI's shape.
    result_turn = {"role": "user", "content": [turns[2]["content"][0]]}
    loop = {**body, "messages": [{"role": "user", "content": PROMPT}, turns[1], result_turn]}
    new, outcome = await requests_rewriter.arewrite(loop, Shape.MESSAGES)
    assert outcome.status == "applied" and outcome.cache == "hit" and new["messages"] == [{"role": "user", "content": REWRITE}, *loop["messages"][1:]]
    images = {**body, "messages": [{"role": "user", "content": [turns[2]["content"][1]]}]}
    same, skipped = await requests_rewriter.arewrite(images, Shape.MESSAGES)
    assert (skipped.status, skipped.reason) == ("skipped", "no_text") and same == images


async def test_policy_and_failures_fail_open(requests_rewriter):
    body = _chat({"role": "user", "content": PROMPT})
    cases = [
        ({"opted_out": True}, body, ("off", None)),
        ({"enabled": False}, body, ("skipped", "model_not_rewritten")),
        ({"unavailable": "optimizer_loading"}, body, ("fallback", "optimizer_loading")),
        ({}, _chat({"role": "assistant", "content": "hi"}), ("skipped", "no_user_message")),
        ({}, _chat({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
         ("skipped", "unsupported_content")),
        ({}, _chat({"role": "user", "content": "What is the capital of France?"}), ("fallback", "answered")),
        ({}, _chat({"role": "user", "content": "slow please, describe the sea"}), ("fallback", "timeout")),
        ({}, _chat({"role": "user", "content": "crash please, describe the sea"}), ("fallback", "backend_error")),
        ({}, {"model": "m", "prompt": ["a", "b"]}, ("skipped", "prompt_not_text")),
    ]
    for options, request, expected in cases:
        shape = Shape.COMPLETIONS if "prompt" in request else Shape.CHAT
        new, outcome = await requests_rewriter.arewrite(request, shape, **options)
        assert (outcome.status, outcome.reason) == expected, (options, request)
        assert new == request and not outcome.changed  # the original goes on


async def test_alignment_goes_where_each_api_keeps_instructions(requests_rewriter):
    preset = load_preset("llama3-8b-instruct")
    chat, outcome = await requests_rewriter.arewrite(_chat({"role": "user", "content": PROMPT}), Shape.CHAT, alignment=preset)
    assert outcome.aligned and outcome.status == "applied"
    assert chat["messages"][0]["role"] == "system" and chat["messages"][0]["content"].startswith(preset.system_prompt)
    assert chat["messages"][1]["content"] == f"# Query:\n{REWRITE}\n\n# Answer:\n<START>" and "<END>" in chat["stop"]
    # Examples are retrieved for the user's own words, not the rewrite.
    assert chat["messages"][0]["content"] == preset.system_message(PROMPT)
    anthropic = {"model": "claude", "max_tokens": 9, "system": "Own system.", "messages": [{"role": "user", "content": PROMPT}]}
    new, _ = await requests_rewriter.arewrite(anthropic, Shape.MESSAGES, alignment=preset)
    assert new["system"] == preset.system_message(PROMPT, keep="Own system.") and new["messages"][0]["content"] == REWRITE
    blocks = {**anthropic, "system": [{"type": "text", "text": "Own.", "cache_control": {"type": "ephemeral"}}]}
    new, _ = await requests_rewriter.arewrite(blocks, Shape.MESSAGES, alignment=preset)
    assert new["system"][1:] == blocks["system"] and new["system"][0]["text"].startswith(preset.system_prompt)


@pytest.mark.slow  # loads MiniLM
def test_a_raw_alignment_turns_a_chat_request_into_one_completions_request():
    raw = Alignment("Be helpful.", icl_examples(), k=1, format=RAW_FORMAT)
    body = {"model": "base", "max_tokens": 7, "temperature": 0, "stream": True, "tools": [], "stop": "###",
            "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
                         {"role": "user", "content": "How do I bake bread?"}]}
    ((request, outcome),) = rewrite_requests([body], Shape.CHAT, None, alignment=raw)
    assert outcome.upstream_shape == Shape.COMPLETIONS and outcome.status == "skipped"
    assert set(request) == {"model", "max_tokens", "temperature", "top_p", "stream", "prompt", "stop"}
    assert (request["max_tokens"], request["temperature"], request["top_p"]) == (7, 0, 0.95)  # the client's, else DRPO's
    ((defaults, _),) = rewrite_requests([{"model": "base", "messages": body["messages"]}], Shape.CHAT, None, alignment=raw)
    assert (defaults["max_tokens"], defaults["temperature"], defaults["top_p"]) == (512, 0.7, 0.95)
    example = raw.retrieve("How do I bake bread?")[0]
    history = RAW_FORMAT.render_example(type(example)("first", "one"))
    assert request["prompt"] == RAW_FORMAT.render_raw(raw.system_message("How do I bake bread?") + history, "How do I bake bread?")
    assert request["prompt"].endswith("#Answer:\n<START>\none\n<END>" + RAW_FORMAT.joiner + "# Query:\nHow do I bake bread?\n\n# Answer:\n<START>")
    assert request["stop"] == ["<END>", "<END", "<|eot_id|>", "###"]  # DRPO's stops are never cut off by the client's


def test_find_prompt_copies_only_what_it_may_edit():
    image = {"type": "image_url", "image_url": {"url": "x"}}
    body = _chat({"role": "user", "content": "old"}, {"role": "user", "content": [{"type": "text", "text": PROMPT}, image]})
    copy_, prompt, reason = find_prompt(body, Shape.CHAT)
    prompt.replace("new")
    assert reason is None and body["messages"][1]["content"][0]["text"] == PROMPT and copy_["messages"][1]["content"][0]["text"] == "new"
    assert copy_["messages"][0] is body["messages"][0] and copy_["messages"][1]["content"][1] is image  # shared, not copied


@pytest.mark.slow
def test_gateway_serves_a_raw_preset_as_one_completions_call(model_server: Server, tmp_path):
    """A chat client talks to a base model behind a raw DRPO alignment: the upstream gets one
    /v1/completions call with DRPO's rendered text; the client gets a chat completion, streamed or not."""
    import openai

    artifact = Alignment("You are a helpful, honest assistant.", icl_examples()[:4], k=1, format=RAW_FORMAT).save(tmp_path / "raw.json")
    config = tmp_path / "proxy.toml"
    config.write_text(f'[default]\nrewrite = false\n[models."base*"]\nrewrite = false\ndrpo = "{artifact}"\n')
    for gateway in start_cli_server(["proxy", "--upstream", model_server.base_url, "--config", str(config)], tmp_path / "log"):
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        question = "Name a fruit."
        answer = client.chat.completions.create(model="base-model", max_tokens=12, temperature=0,
                                                messages=[{"role": "user", "content": question}])
        assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
        assert isinstance(answer.choices[0].message.content, str) and "<START>" not in answer.choices[0].message.content
        sent = model_server.received()[-1]
        assert sent["path"] == "/v1/completions" and "messages" not in sent["body"]
        assert sent["body"]["prompt"].startswith("# instructions\n\nYou are a helpful, honest assistant.")
        assert sent["body"]["prompt"].endswith(f"# Query:\n{question}\n\n# Answer:\n<START>") and "<END>" in sent["body"]["stop"]
        stream = client.chat.completions.create(model="base-model", max_tokens=12, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": question}])
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip() == answer.choices[0].message.content  # greedy: the same answer either way
        assert model_server.received()[-1]["path"] == "/v1/completions"
        error = httpx.post(gateway.base_url + "/chat/completions", json={"model": "base-model", "messages": "nope"}, timeout=30)
        assert error.status_code == 400 and json.loads(error.content)["error"]["param"] == "messages"


@pytest.mark.slow  # loads MiniLM
def test_drpo_base_model_presets_are_served_raw_and_instruct_presets_as_chat():
    from bpo_plugins.drpo import load_alignment

    messages = [{"role": "user", "content": "How do I bake bread?"}]
    for name in ("llama3-8b", "meta-llama/Meta-Llama-3-8B", "mistral-7b-v0.1"):
        base = load_alignment(name)
        ((request, outcome),) = rewrite_requests([{"model": "m", "messages": messages}], Shape.CHAT, None, alignment=base)
        assert outcome.upstream_shape == Shape.COMPLETIONS and request["prompt"].startswith(base.system_prompt)
        assert request["prompt"] == base.render("How do I bake bread?")  # DRPO's auto_model.py text, nothing added
    ((chat, outcome),) = rewrite_requests([{"model": "m", "messages": messages}], Shape.CHAT, None,
                                          alignment=load_alignment("llama3-8b-instruct"))
    assert outcome.upstream_shape is None and chat["messages"][0]["role"] == "system"


@pytest.mark.slow  # loads MiniLM
def test_a_raw_request_keeps_the_apps_system_text_after_drpos_prompt():
    raw = Alignment("Be helpful.", icl_examples(), k=1, format=RAW_FORMAT)
    body = {"model": "base", "stop": ["a", "b", "c", "d"],
            "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "How do I bake bread?"}]}
    ((request, _),) = rewrite_requests([body], Shape.CHAT, None, alignment=raw)
    assert request["prompt"] == RAW_FORMAT.render_raw(raw.system_message("How do I bake bread?", keep="Answer in French."),
                                                      "How do I bake bread?")
    assert request["stop"] == ["<END>", "<END", "<|eot_id|>", "a"]


class _QueryRecorder:
    """An embedder that keeps every text it is asked to embed: which query an edge retrieved for."""

    name = "query-recorder"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, texts):
        import numpy as np

        self.seen += list(texts)
        return np.ones((len(texts), 2)) / np.sqrt(2)


def test_bpo_and_drpo_take_the_same_last_user_message_at_every_edge():
    """Issue 28: a user turn of tool results only is not the prompt for BPO (chat.last_user_index), but
    Alignment.apply, the raw completion and LangChain's middleware took it. One rule now, at every edge."""
    from langchain.agents.middleware import ModelRequest
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import AIMessage, HumanMessage

    from bpo_plugins.chat import last_user_index
    from bpo_plugins.drpo.serving import _raw_completion
    from bpo_plugins.langchain import DRPOMiddleware

    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}}
    results = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "result"}]
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": [tool_use]}, {"role": "user", "content": results}]
    assert last_user_index(messages) == 0 and find_prompt({"messages": messages}, Shape.CHAT)[1].text == PROMPT

    def aligned(fmt=None) -> tuple[Alignment, _QueryRecorder]:
        recorder = _QueryRecorder()
        alignment = Alignment("Be kind.", tuple(icl_examples()[:2]), k=1, **({"format": fmt} if fmt else {}))
        return alignment.use_embedder(recorder), recorder

    chat, recorder = aligned()
    applied = chat.apply(messages)
    assert applied[1]["content"] == chat.format.render_user(PROMPT) and applied[3] == messages[2] and recorder.seen[-1] == PROMPT
    raw, recorder = aligned(RAW_FORMAT)
    request = _raw_completion({"model": "m", "messages": messages}, raw, None)
    assert request["prompt"] == raw.render(PROMPT) and recorder.seen[-1] == PROMPT
    middleware_alignment, recorder = aligned()
    lc_messages = [HumanMessage(PROMPT), AIMessage(content=[tool_use]), HumanMessage(content=results)]
    DRPOMiddleware(middleware_alignment)._request(ModelRequest(model=FakeListChatModel(responses=["ok"]), messages=lc_messages))
    assert recorder.seen[-1] == PROMPT
