"""The BPO guardrail on LiteLLM's Anthropic route (``/v1/messages``, call type ``anthropic_messages``),
through a real LiteLLM proxy process in front of the scripted Anthropic upstream."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import pytest

from tests.conftest import Server
from tests.support.anthropic_server import reply_for
from tests.support.processes import anthropic_upstream, start_litellm

pytestmark = pytest.mark.slow
HARRY = "Tell me about Harry Potter"
HARRY_REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."
LITELLM_KEY = "sk-" + "7a" * 32


@pytest.fixture(scope="module")
def claude_upstream() -> Server:
    yield from anthropic_upstream()


def _litellm(script_server: Server, upstream: Server, folder: Path, optimizer_base_url: str):
    """A LiteLLM proxy whose one model is the scripted Anthropic upstream, with the BPO guardrail on by default.
    (LiteLLM 1.108 runs every pre_call guardrail on /v1/messages whatever the request's "guardrails" say,
    so each guardrail setting gets its own proxy.)"""
    yield from start_litellm(
        "model_list:\n  - model_name: claude-test\n    litellm_params:\n      model: anthropic/claude-test\n"
        f"      api_base: {upstream.url}\n      api_key: sk-ant-upstream\n"
        "guardrails:\n  - guardrail_name: bpo\n    litellm_params:\n      guardrail: bpo_plugins.litellm.BPOGuardrail\n"
        f"      mode: pre_call\n      default_on: true\n      optimizer: script\n      optimizer_base_url: {optimizer_base_url}\n"
        "      rewrite_timeout_s: 2.0\n", folder, LITELLM_KEY)


@pytest.fixture(scope="module")
def litellm_proxy(script_server: Server, claude_upstream: Server, tmp_path_factory: pytest.TempPathFactory):
    yield from _litellm(script_server, claude_upstream, tmp_path_factory.mktemp("litellm-messages"), script_server.base_url)


@pytest.fixture(scope="module")
def litellm_dead_optimizer(script_server: Server, claude_upstream: Server, tmp_path_factory: pytest.TempPathFactory):
    yield from _litellm(script_server, claude_upstream, tmp_path_factory.mktemp("litellm-dead"), "http://127.0.0.1:9/v1")


def last_sent(upstream: Server) -> dict:
    return [r for r in httpx.get(upstream.base_url + "/received").json()["received"] if r["path"] == "/v1/messages"][-1]["body"]


def test_guardrail_rewrites_on_litellms_messages_route(litellm_proxy, claude_upstream):
    c = anthropic.Anthropic(base_url=litellm_proxy, api_key=LITELLM_KEY, max_retries=0)
    blocks = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
              {"type": "text", "text": HARRY}]
    answer = c.messages.create(model="claude-test", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": blocks}])
    sent = last_sent(claude_upstream)
    assert sent["messages"][-1]["content"] == [blocks[0], {"type": "text", "text": HARRY_REWRITE}]  # the image untouched
    assert sent["system"] == "Be brief." and "bpo_rewrite" not in str(sent)  # our note stays in LiteLLM's metadata
    assert answer.content[0].text == reply_for(HARRY_REWRITE)

    with c.messages.stream(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": HARRY}]) as stream:
        assert "".join(stream.text_stream) == reply_for(HARRY_REWRITE)


def test_guardrail_fails_open_on_litellms_messages_route(litellm_dead_optimizer, claude_upstream):
    c = anthropic.Anthropic(base_url=litellm_dead_optimizer, api_key=LITELLM_KEY, max_retries=0)
    answer = c.messages.create(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": HARRY}])
    assert last_sent(claude_upstream)["messages"][-1]["content"] in (HARRY, [{"type": "text", "text": HARRY}])
    assert answer.content[0].text == reply_for(HARRY)
