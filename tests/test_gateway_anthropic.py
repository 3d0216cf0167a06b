"""``bpo proxy``'s Anthropic Messages API, with the official ``anthropic`` client, against real processes.

The upstream is ``tests/support/anthropic_server.py``: each request's reply is made from its own last
user text (:func:`reply_for`), streamed as Anthropic's SSE events, with fault switches in
``x-test-fault``. The optimizer is the scripted OpenAI-compatible process (``script_server``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from pathlib import Path

import anthropic
import httpx
import httpx2  # the anthropic SDK's own HTTP client
import pytest

from tests.conftest import CLIServer, Server, start_cli_server, wait_for_event
from tests.support.anthropic_server import reply_for
from tests.support.processes import anthropic_upstream

pytestmark = pytest.mark.slow
HARRY = "Tell me about Harry Potter"
HARRY_REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."
UPSTREAM_KEY = "sk-ant-upstream-SECRET-9876"
GATEWAY_KEY = "gw-key-SECRET-4242"
DRPO_PROMPT = "You are a careful assistant who checks every claim."


@pytest.fixture(scope="module")
def claude_upstream() -> Server:
    yield from anthropic_upstream()


def _gateway(script_server: Server, upstream: Server, folder: Path, env: dict[str, str]) -> CLIServer:
    from bpo_plugins.drpo import Alignment, icl_examples

    artifact = Alignment(DRPO_PROMPT, icl_examples()[:4], k=1).save(folder / "drpo.json")
    config = folder / "proxy.toml"
    config.write_text('upstream_timeout_s = 1.5\nrewrite_timeout_s = 2.0\nmax_body_bytes = 200000\n'
                      '[models."claude-relay*"]\nrewrite = false\n'
                      f'[models."claude-drpo*"]\nrewrite = false\ndrpo = "{artifact}"\n')
    args = ["proxy", "--upstream", script_server.base_url, "--anthropic-upstream", upstream.url,
            "--optimizer", "script", "--optimizer-base-url", script_server.base_url, "--config", str(config)]
    return start_cli_server(args, folder / "gateway.log", env=env)


@pytest.fixture(scope="module")
def gateway(script_server: Server, claude_upstream: Server, tmp_path_factory: pytest.TempPathFactory):
    yield from _gateway(script_server, claude_upstream, tmp_path_factory.mktemp("anthropic-gw"),
                        {"BPO_UPSTREAM_ANTHROPIC_API_KEY": UPSTREAM_KEY})


def client(gateway: CLIServer, **kw) -> anthropic.Anthropic:
    # The anthropic client's base URL has no /v1, as Claude Code's ANTHROPIC_BASE_URL.
    return anthropic.Anthropic(base_url=gateway.url, api_key=kw.pop("api_key", "sk-ant-client"), max_retries=0, **kw)


def received(upstream: Server, path: str = "/v1/messages") -> list[dict]:
    return [r for r in httpx.get(upstream.base_url + "/received").json()["received"] if r["path"] == path]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def timing_headers_ok(headers: httpx.Headers, cache: str | None = None) -> None:
    assert float(headers["x-bpo-overhead-ms"]) >= 0 and float(headers["x-bpo-rewrite-ms"]) >= 0
    assert headers["x-bpo-cache"] in ("hit", "miss", "off") if cache is None else headers["x-bpo-cache"] == cache


# --- the official client, streaming and not ----------------------------------------------------


def test_anthropic_client_gets_the_answer_to_the_rewritten_prompt(gateway, claude_upstream):
    c = client(gateway)
    raw = c.messages.with_raw_response.create(model="claude-test", max_tokens=64, messages=user(HARRY),
                                              extra_headers={"anthropic-beta": "tools-2024-04-04", "anthropic-version": "2023-06-01"})
    assert raw.headers["x-bpo-rewrite"] == "applied"
    timing_headers_ok(raw.headers)
    assert float(raw.headers["x-bpo-rewrite-ms"]) > 0
    assert raw.parse().content[0].text == reply_for(HARRY_REWRITE)
    sent = received(claude_upstream)[-1]
    assert sent["body"]["messages"] == user(HARRY_REWRITE)
    assert sent["headers"]["anthropic-version"] == "2023-06-01" and sent["headers"]["anthropic-beta"] == "tools-2024-04-04"
    assert sent["headers"]["authorization"] == "Bearer sk-ant-client"  # the client's own key goes upstream
    assert raw.headers["request-id"].startswith("req_")  # the upstream's headers come back

    with c.messages.stream(model="claude-test", max_tokens=64, messages=user(HARRY)) as stream:
        assert stream.response.headers["x-bpo-rewrite"] == "applied"
        timing_headers_ok(stream.response.headers, "hit")  # the same prompt again: the rewrite cache answers
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == reply_for(HARRY_REWRITE) and final.stop_reason == "end_turn"


def test_sse_events_are_relayed_one_by_one(gateway):
    body = {"model": "claude-relay", "max_tokens": 64, "messages": user("count the events"), "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}, timeout=30) as r:
        events = [line[len("event: "):] for line in r.iter_lines() if line.startswith("event: ")]
        assert r.headers["x-bpo-rewrite"] == "skipped; reason=model_not_rewritten"
        timing_headers_ok(r.headers, "off")
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events.count("content_block_delta") == 25


def test_tool_image_and_thinking_blocks_and_earlier_turns_stay_byte_for_byte(gateway, claude_upstream):
    turns = [
        {"role": "user", "content": "Look at this for me."},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "I should call the tool.", "signature": "sig=="},
                                          {"type": "tool_use", "id": "toolu_01", "name": "look", "input": {"q": "cat", "n": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "a cat on a mat"}]},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="}},
            {"type": "text", "text": HARRY, "cache_control": {"type": "ephemeral"}}]},
    ]
    tools = [{"name": "look", "description": "Look something up.", "input_schema": {"type": "object", "properties": {}}}]
    raw = client(gateway).messages.with_raw_response.create(model="claude-test", max_tokens=64, messages=copy.deepcopy(turns), tools=tools)
    assert raw.headers["x-bpo-rewrite"] == "applied"
    expected = copy.deepcopy(turns)
    expected[2]["content"][2]["text"] = HARRY_REWRITE
    sent = received(claude_upstream)[-1]["body"]
    assert sent["messages"] == expected and sent["tools"] == tools

    # An agent's tool loop: a user turn of only tool results is not the prompt; the turn before it is
    # (the same prompt each round, so one cached rewrite). The tool result and the rest stay as sent.
    loop = [{"role": "user", "content": HARRY}, turns[1], {"role": "user", "content": [turns[2]["content"][0]]}]
    raw_body = json.dumps({"model": "claude-test", "max_tokens": 64, "messages": loop}, separators=(",", ":")).encode()
    response = httpx.post(gateway.url + "/v1/messages", content=raw_body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200 and response.headers["x-bpo-rewrite"] == "applied"
    assert response.headers["x-bpo-cache"] == "hit"  # rewritten once already, above
    assert received(claude_upstream)[-1]["body"]["messages"] == [{"role": "user", "content": HARRY_REWRITE}, *loop[1:]]


def test_a_drpo_alignment_goes_into_the_top_level_system(gateway, claude_upstream):
    c = client(gateway)
    messages = [{"role": "user", "content": "Name a fruit."}]
    for system in ("Answer in French.", [{"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}}]):
        raw = c.messages.with_raw_response.create(model="claude-drpo", max_tokens=32, system=system, messages=messages)
        assert raw.headers["x-bpo-rewrite"] == "skipped; reason=model_not_rewritten"
        sent = received(claude_upstream)[-1]["body"]
        assert sent["messages"] == messages  # never into a message
        if isinstance(system, str):
            assert sent["system"].startswith(DRPO_PROMPT) and "#Query:" in sent["system"] and "Answer in French." in sent["system"]
        else:  # blocks stay blocks, the client's own (cache_control and all) after DRPO's
            assert sent["system"][0]["text"].startswith(DRPO_PROMPT) and sent["system"][1:] == system


def test_count_tokens_passes_through(gateway, claude_upstream):
    counted = client(gateway).messages.count_tokens(model="claude-test", messages=user(HARRY))
    assert counted.input_tokens > 0
    sent = received(claude_upstream, "/v1/messages/count_tokens")[-1]
    assert sent["body"]["messages"] == user(HARRY)  # never rewritten: it must count what the client sends


def test_upstream_errors_pass_through_verbatim(gateway):
    c = client(gateway)
    for code, error in ((400, anthropic.BadRequestError), (429, anthropic.RateLimitError), (500, anthropic.InternalServerError),
                        (529, anthropic.InternalServerError)):
        with pytest.raises(error) as caught:
            c.messages.create(model="claude-relay", max_tokens=8, messages=user("hi"), extra_headers={"x-test-fault": f"status={code}"})
        assert caught.value.status_code == code
        assert caught.value.body == {"type": "error", "error": {"type": caught.value.body["error"]["type"], "message": f"scripted {code}"}}
        assert caught.value.response.headers["retry-after"] == "1" and caught.value.response.headers["request-id"] == "req_fault"
        timing_headers_ok(caught.value.response.headers)


def test_a_hanging_upstream_gives_an_anthropic_shaped_504(gateway):
    with pytest.raises(anthropic.APIStatusError) as caught:
        client(gateway).messages.create(model="claude-relay", max_tokens=8, messages=user("hi"), extra_headers={"x-test-fault": "hang"})
    assert caught.value.status_code == 504
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "timeout_error"
    timing_headers_ok(caught.value.response.headers)


def test_a_stream_that_breaks_ends_with_an_in_band_error_event(gateway):
    c = client(gateway)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with c.messages.stream(model="claude-relay", max_tokens=64, messages=user("break please"),
                               extra_headers={"x-test-fault": "reset"}) as stream:
            for _ in stream.text_stream:
                pass
    assert "the upstream stream broke off" in str(caught.value)


def test_client_disconnect_cancels_the_upstream_request(gateway, claude_upstream):
    body = {"model": "claude-relay", "max_tokens": 64, "messages": user("a long story"), "stream": True}
    headers = {"x-test-fault": "trickle=0.2", "x-test-id": "msg-mid-stream"}
    with httpx.stream("POST", gateway.url + "/v1/messages", json=body, headers=headers, timeout=30) as r:
        next(r.iter_lines())  # the first event arrived: hang up mid-stream
    assert wait_for_event(claude_upstream.base_url, "msg-mid-stream", "closed") == "closed"

    headers = {"x-test-fault": "latency=1", "x-test-id": "msg-before-first"}  # the upstream is still thinking
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/messages", json=body, headers=headers, timeout=0.4)
    assert wait_for_event(claude_upstream.base_url, "msg-before-first", "closed") == "closed"


async def test_200_concurrent_streams_each_get_their_own_answer(gateway):
    prompts = [f"stream {i}: {random.random()}" for i in range(200)]
    http = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=200, max_keepalive_connections=200), timeout=60)
    c = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="sk-ant-client", max_retries=0, http_client=http)

    async def one(prompt: str) -> tuple[str, str | None]:
        async with c.messages.stream(model="claude-relay", max_tokens=64, messages=user(prompt)) as stream:
            text = "".join([t async for t in stream.text_stream])
            return text, (await stream.get_final_message()).stop_reason

    async with http:
        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)
    mixed = sum(text != reply_for(p) and text in {reply_for(q) for q in prompts} for (text, _), p in zip(results, prompts))
    lost_or_truncated = sum(stop != "end_turn" or text != reply_for(p) for (text, stop), p in zip(results, prompts))
    assert (mixed, lost_or_truncated) == (0, 0)


# --- malformed input -------------------------------------------------------------------------------


def _malformed(rng: random.Random) -> bytes:
    """A Messages request with at least one thing the gateway must refuse (or not JSON at all)."""
    base = {"model": "claude-test", "max_tokens": 32, "messages": [{"role": "user", "content": "hello"}]}
    junk = [None, 5, -1.5, True, "x", [], {}, [1, "a"], {"a": None}, "\ud800", 10**30]
    kind = rng.randrange(14)
    body: object = copy.deepcopy(base)
    assert isinstance(body, dict)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if kind == 1:
        return json.dumps(base).encode()[: rng.randint(0, 40)]  # truncated
    if kind == 2:
        return json.dumps(rng.choice([[], None, 5, "text", [base]])).encode()
    if kind == 3:
        body["messages"] = rng.choice([None, 5, "hi", {}, [], {"role": "user"}])
    elif kind == 4:
        body["messages"] = [rng.choice([j for j in junk if not isinstance(j, dict)])]
    elif kind == 5:
        body["messages"][0]["role"] = rng.choice(["system", "tool", "", 5, None, ["user"]])
    elif kind == 6:
        body["messages"][0]["content"] = rng.choice([5, None, True, {"type": "text"}, 2.5])
    elif kind == 7:
        body["messages"][0]["content"] = [rng.choice([5, None, "text", [], {"text": "no type"}, {"type": 7}])]
    elif kind == 8:
        body["messages"][0]["content"] = [{"type": "text", "text": rng.choice([None, 5, ["a"], {"a": 1}])}]
    elif kind == 9:
        body["system"] = rng.choice([5, True, {"text": "x"}, [5], [{"type": "text"}], [{"text": 3}]])
    elif kind == 10:
        body["model"] = rng.choice([5, None, ["claude"], {"id": 1}, True])
    elif kind == 11:
        body["stream"] = rng.choice(["yes", 1, None, [], {"on": True}])
    elif kind == 12:
        body["messages"].append({"role": rng.choice(["robot", "", None]), "content": "x"})
    else:
        return b"[" * rng.randint(1000, 60000)  # nesting past any parser's recursion limit
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")


async def test_1000_malformed_bodies_get_4xx_never_5xx(gateway):
    rng = random.Random(22)
    bodies = [_malformed(rng) for _ in range(1200)] + [b"x" * 300_000]  # the last is over the 200 kB limit
    statuses: dict[int, int] = {}
    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(timeout=30) as http:

        async def send(body: bytes) -> None:
            async with limit:
                response = await http.post(gateway.url + "/v1/messages", content=body,
                                           headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                error = response.json()
                assert error["type"] == "error" and isinstance(error["error"]["message"], str), response.text  # Anthropic's shape
                timing_headers_ok(response.headers)

        await asyncio.wait_for(asyncio.gather(*(send(b) for b in bodies)), 120)
    assert all(400 <= status < 500 for status in statuses), statuses
    assert sum(statuses.values()) == 1201 and statuses.get(413) == 1
    assert gateway.process.poll() is None and httpx.get(gateway.url + "/health").status_code == 200


# --- keys ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_gateway(script_server: Server, claude_upstream: Server, tmp_path_factory: pytest.TempPathFactory):
    yield from _gateway(script_server, claude_upstream, tmp_path_factory.mktemp("anthropic-keys"),
                        {"BPO_UPSTREAM_ANTHROPIC_API_KEY": UPSTREAM_KEY, "BPO_GATEWAY_KEYS": GATEWAY_KEY})


def test_a_gateway_key_is_swapped_for_the_upstream_key(keyed_gateway, claude_upstream):
    body = {"model": "claude-relay", "max_tokens": 8, "messages": user("k1")}
    # Claude Code's ANTHROPIC_API_KEY (x-api-key) holding the gateway's key.
    response = httpx.post(keyed_gateway.url + "/v1/messages?beta=true", json=body,  # as Claude Code sends it
                          headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"})
    assert response.status_code == 200
    sent = received(claude_upstream)[-1]
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent["headers"] and sent["query"] == "beta=true"

    # The anthropic client's key (a Bearer token, as ANTHROPIC_AUTH_TOKEN) holding the gateway's key.
    client(keyed_gateway, api_key=GATEWAY_KEY).messages.create(model="claude-relay", max_tokens=8, messages=user("k2"))
    sent = received(claude_upstream)[-1]["headers"]
    assert sent["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent

    # The gateway's key in X-BPO-Key: the client's own Anthropic key goes upstream, whichever header holds it.
    client(keyed_gateway, api_key="sk-ant-own", default_headers={"X-BPO-Key": GATEWAY_KEY}).messages.create(
        model="claude-relay", max_tokens=8, messages=user("k3"))
    sent = received(claude_upstream)[-1]["headers"]
    assert sent["authorization"] == "Bearer sk-ant-own" and "x-api-key" not in sent and "x-bpo-key" not in sent
    httpx.post(keyed_gateway.url + "/v1/messages", json=body, headers={"x-api-key": "sk-ant-own2", "x-bpo-key": GATEWAY_KEY})
    assert received(claude_upstream)[-1]["headers"]["x-api-key"] == "sk-ant-own2"

    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(keyed_gateway, api_key="sk-ant-wrong").messages.create(model="claude-relay", max_tokens=8, messages=user("k4"))
    assert caught.value.body["error"]["type"] == "authentication_error"
    log = keyed_gateway.log.read_text()
    assert GATEWAY_KEY not in log and UPSTREAM_KEY not in log and "sk-ant-wrong" not in log
