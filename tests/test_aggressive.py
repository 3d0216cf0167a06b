"""BPO's aggressive mode as thu-coai/BPO's ``infer_example.py`` runs it, and its English-only check: local
runtimes on a real tiny model, the requests a scripted server records, pass-throughs that cost no call."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bpo_plugins import FallbackReason, GuardConfig, Rewriter
from bpo_plugins.decoding import decoding_for
from bpo_plugins.guards import BANNED_MARKERS
from bpo_plugins.templates import BPO, PROMPT_ENGINEER
from tests.conftest import start_server

HAS_GENAI = __import__("importlib").util.find_spec("onnxruntime_genai") is not None
PROMPT = "how can I create a profile on Facebook?"  # the reference's own example


def test_decoding_of_each_mode_is_the_references():
    aggressive = decoding_for("aggressive", max_new_tokens=1024)
    assert (aggressive.do_sample, aggressive.temperature, aggressive.top_p, aggressive.num_candidates) == (True, 0.9, 0.9, 5)
    assert aggressive.banned_words == ("[PROTECT]", "\n\n[PROTECT]", "[KEEP", "[INSTRUCTION]")
    assert aggressive.stop_at_newline and aggressive.min_tokens_over_prompt == 5
    stable = decoding_for("stable", max_new_tokens=1024)
    assert (stable.temperature, stable.top_p, stable.num_candidates, stable.stop_at_newline) == (0.6, 0.9, 1, False)
    # A general LLM as prompt engineer writes multi-line prompts: sampling settings only.
    general = decoding_for("aggressive", max_new_tokens=1024, bpo_recipe=False)
    assert (general.temperature, general.top_p, general.stop_at_newline, general.min_tokens_over_prompt) == (0.9, 0.9, False, None)


def test_a_general_llm_gets_no_banned_words():
    """Issue 28: a general local LLM as prompt engineer still had BPO's training markers banned; like
    the newline stop and the minimum, they are BPO's recipe for its own checkpoint."""
    assert decoding_for("aggressive", max_new_tokens=64, bpo_recipe=False).banned_words == ()
    assert decoding_for("aggressive", max_new_tokens=64).banned_words == BANNED_MARKERS


# --- local runtimes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lines_dir(tiny_bpo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with every token embedded alike, so its next-token logits are the same after any
    text, set to rank: newline 30, end of sequence 25, " word" 20, " other" 15, every other token 0.
    Sampled at T 0.9 and top_p 0.9 it writes the first token its stops and bans leave free."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_bpo_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_bpo_dir)
    one = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    ranks = {one("\n"): 30.0, tokenizer.eos_token_id: 25.0, one(" word"): 20.0, one(" other"): 15.0}
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = 1.0
        last = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[:] = 0.0
        for token, logit in ranks.items():
            model.lm_head.weight[token] = logit * last / last.dot(last)
    folder = tmp_path_factory.mktemp("lines") / "BPO-lines"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["transformers", pytest.param("genai", marks=pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai not installed"))])
def lines_rewriter(request, lines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Rewriter:
    source = lines_dir
    if request.param == "genai":
        from bpo_plugins.export.onnx import export_onnx

        source = tmp_path_factory.mktemp("lines-genai") / "fp32"
        export_onnx(str(lines_dir), source, "fp32", engine="genai", check=False)
    return Rewriter.from_pretrained(source, cache_size=0, max_new_tokens=64)


def test_aggressive_samples_stop_at_a_newline_once_they_reach_the_prompts_length_plus_5(lines_rewriter):
    backend, template = lines_rewriter.backend, lines_rewriter.template
    assert template == BPO
    aggressive = decoding_for("aggressive", max_new_tokens=40)
    prompts = [PROMPT, "Write a poem"]
    # infer_example.py: min_length = len(ids(template(text))) + len(ids(text)) + 5 counts the input too.
    floors = [len(backend.tokenizer(p)["input_ids"]) + 5 for p in prompts]
    assert backend.min_new_tokens(prompts, aggressive) == floors
    output = backend.generate(prompts, template, aggressive, None)
    for generation, floor in zip(output.generations, floors):
        # Each sample: `floor` tokens with its stops held back, then the newline that ends it.
        assert generation.output_tokens == 5 * (floor + 1)
        assert generation.texts == [" word" * floor] * 5
    # Without the minimum the newline comes first and ends the sample at once.
    bare = backend.generate([PROMPT], template, replace(aggressive, min_tokens_over_prompt=None), None).generations[0]
    assert bare.texts == [""] * 5 and bare.output_tokens == 5
    # Without the newline stop a newline is just a token.
    free = replace(aggressive, min_tokens_over_prompt=None, stop_at_newline=False, stop_loops=False, max_new_tokens=6)
    assert backend.generate([PROMPT], template, free, None).generations[0].texts == ["\n" * 6] * 5


def test_a_minimum_above_the_cap_raises_the_cap_so_samples_still_end_at_a_newline(lines_rewriter):
    """Issue 28: an uncapped minimum held EOS and newline back until the cap, so every sample ran to it."""
    backend, template = lines_rewriter.backend, lines_rewriter.template
    floor = len(backend.tokenizer(PROMPT)["input_ids"]) + 5
    capped = decoding_for("aggressive", max_new_tokens=floor - 4)  # the minimum does not fit this cap
    generation = backend.generate([PROMPT], template, capped, None).generations[0]
    assert generation.texts == [" word" * floor] * 5 and generation.output_tokens == 5 * (floor + 1)


def test_aggressive_samples_never_write_a_banned_word(lines_rewriter):
    backend, template = lines_rewriter.backend, lines_rewriter.template
    aggressive = decoding_for("aggressive", max_new_tokens=40)
    # BPO's markers, bare and after a space, as the token sequences the runtime forbids.
    banned = backend._banned(BANNED_MARKERS)
    assert backend.tokenizer("[KEEP", add_special_tokens=False)["input_ids"] in banned
    floor = len(backend.tokenizer(PROMPT)["input_ids"]) + 5
    texts = backend.generate([PROMPT], template, replace(aggressive, banned_words=(*BANNED_MARKERS, "word")), None).generations[0].texts
    assert texts == [" other" * floor] * 5


def test_the_rewriter_runs_aggressive_mode_with_the_local_stops(lines_rewriter):
    result = lines_rewriter.rewrite(PROMPT, mode="aggressive")
    floor = len(lines_rewriter.backend.tokenizer(PROMPT)["input_ids"]) + 5
    assert result.candidates == ("word" + " word" * (floor - 1),) * 5 and result.output_tokens == 5 * (floor + 1)
    assert result.fallback is FallbackReason.DEGENERATE  # and the guards still judge what came out


# --- over HTTP ---------------------------------------------------------------------------------

SCRIPT = {
    "bad minimum": "__error__:400:min_tokens must be less than or equal to max_tokens=8, got 9.",
    "Harry Potter": "Provide an overview of the Harry Potter book series, covering its plot and themes.\nA second line.",
    "bad request": "__error__:400",
}


@pytest.fixture(scope="module")
def script_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("aggressive") / "script.json"
    path.write_text(json.dumps(SCRIPT))
    return str(path)


@pytest.fixture(scope="module")
def server(script_path):
    yield from start_server("--script", script_path)


@pytest.fixture(scope="module")
def strict_server(script_path):
    """A server that answers 400 to vLLM's ``bad_words``, as OpenAI's API does to a field it does not know."""
    yield from start_server("--script", script_path, "--reject-field", "bad_words")


def test_a_bpo_checkpoint_on_a_server_gets_the_references_aggressive_fields(server):
    from bpo_plugins.backends.openai import _estimate_tokens

    rewriter = Rewriter.from_openai("script-bpo", base_url=server.base_url, cache_size=0)
    result = rewriter.rewrite("Tell me about Harry Potter", mode="aggressive")
    sent = server.received()[-1]
    assert sent["path"] == "/v1/completions"
    body = sent["body"]
    assert body["prompt"] == BPO.render_raw("Tell me about Harry Potter")
    assert (body["temperature"], body["top_p"], body["n"], body["stop_token_ids"]) == (0.9, 0.9, 5, [13])
    assert body["min_tokens"] == _estimate_tokens("Tell me about Harry Potter") + 5
    assert body["bad_words"] == list(BANNED_MARKERS)
    # This server ignores "stop": the Rewriter cuts at the newline itself.
    assert result.fallback is None and result.rewritten.endswith("themes.") and "\n" not in result.rewritten
    rewriter.rewrite("Tell me about Harry Potter", mode="stable")
    stable = server.received()[-1]["body"]
    assert (stable["temperature"], stable["top_p"], stable["n"]) == (0.6, 0.9, 1)
    assert not {"stop", "min_tokens", "bad_words", "stop_token_ids"} & stable.keys()


def test_an_api_llm_gets_what_its_api_takes(server):
    rewriter = Rewriter.from_openai("script", base_url=server.base_url, cache_size=0)
    assert rewriter.template is PROMPT_ENGINEER
    result = rewriter.rewrite("Tell me about Harry Potter", mode="aggressive")
    body = server.received()[-1]["body"]
    assert server.received()[-1]["path"] == "/v1/chat/completions"
    assert (body["temperature"], body["top_p"], body["n"]) == (0.9, 0.9, 5)
    # vLLM's fields go to self-hosted checkpoints only; logit_bias needs the API model's tokenizer.
    assert not {"stop", "min_tokens", "bad_words", "logit_bias"} & body.keys()
    assert "\n" in result.rewritten  # a general LLM's multi-line prompt is kept whole


def test_anthropic_gets_no_banned_words_as_stop_sequences(server):
    rewriter = Rewriter.from_anthropic("script-claude", api_key="test", base_url=server.url, cache_size=0)
    before = len(server.received())
    result = rewriter.rewrite("Tell me about Harry Potter", mode="aggressive")
    requests = [r["body"] for r in server.received()[before:]]
    assert len(requests) == 5 and len(result.candidates) == 5
    assert all("stop_sequences" not in body for body in requests)


def test_a_field_a_server_rejects_is_dropped_once_and_remembered_for_that_server(strict_server, server):
    first = Rewriter.from_openai("script-bpo", base_url=strict_server.base_url, cache_size=0)
    assert first.rewrite("Tell me about Harry Potter", mode="aggressive").fallback is None
    sent = [r["body"] for r in strict_server.received()]
    assert len(sent) == 2 and "bad_words" in sent[0] and "bad_words" not in sent[1]
    assert sent[1]["min_tokens"] == sent[0]["min_tokens"]  # only the field it named is dropped
    # A new Rewriter (a new client) on the same server does not send it again.
    second = Rewriter.from_openai("script-bpo", base_url=strict_server.base_url, cache_size=0)
    assert second.rewrite("Tell me about Harry Potter", mode="aggressive").fallback is None
    sent = [r["body"] for r in strict_server.received()]
    assert len(sent) == 3 and "bad_words" not in sent[2]
    # Another server still gets it.
    Rewriter.from_openai("script-bpo", base_url=server.base_url, cache_size=0).rewrite("Tell me about Harry Potter", mode="aggressive")
    assert "bad_words" in server.received()[-1]["body"]
    # A 400 that names no field we may drop is a failure, not retried.
    failed = second.rewrite("Please handle this bad request about Harry", mode="aggressive")
    assert failed.fallback is FallbackReason.BACKEND_ERROR and len(strict_server.received()) == 4


@pytest.fixture(scope="module")
def vllm_server(script_path):
    """A server that answers 400 to ``min_tokens`` above ``max_tokens``, as vLLM does."""
    yield from start_server("--script", script_path, "--vllm-limits")


LONG_PROMPT = "Tell me about Harry Potter. " + " ".join(f"Detail {i} of the books matters to me." for i in range(35))


def test_a_long_aggressive_prompt_gets_a_cap_its_minimum_fits_and_short_ones_keep_their_minimum(vllm_server):
    """Issue 28: a ~240-word prompt sent min_tokens 327 over max_tokens 256; vLLM's 400 then dropped
    min_tokens for that server for the rest of the process."""
    rewriter = Rewriter.from_openai("script-bpo", base_url=vllm_server.base_url, cache_size=0)
    assert len(LONG_PROMPT.split()) > 240
    long = rewriter.rewrite(LONG_PROMPT, mode="aggressive")
    assert long.fallback is not FallbackReason.BACKEND_ERROR
    short = rewriter.rewrite("Tell me about Harry Potter", mode="aggressive")
    sent = [r["body"] for r in vllm_server.received()]
    assert len(sent) == 2 and all(body["min_tokens"] <= body["max_tokens"] for body in sent)
    assert sent[0]["min_tokens"] > 256 and short.fallback is None


def test_a_400_about_a_fields_value_drops_no_field(server):
    """Only a 400 that says the server does not know a field may drop it; vLLM's value errors name one too."""
    rewriter = Rewriter.from_openai("script-bpo", base_url=server.base_url, cache_size=0)
    before = len(server.received())
    failed = rewriter.rewrite("Please handle this bad minimum request", mode="aggressive")
    assert failed.fallback is FallbackReason.BACKEND_ERROR and len(server.received()) == before + 1
    rewriter.rewrite("Tell me about Harry Potter", mode="aggressive")
    assert "min_tokens" in server.received()[-1]["body"]


@pytest.fixture(scope="module")
def no_stop_ids_server(script_path):
    """A server that does not know vLLM's ``stop_token_ids`` (SGLang, TGI)."""
    yield from start_server("--script", script_path, "--reject-field", "stop_token_ids")


def test_the_newline_goes_as_a_stop_token_id_so_the_server_holds_it_until_the_minimum(server, no_stop_ids_server):
    """vLLM holds stop_token_ids back until min_tokens, not stop strings: the reference's eos_token_id=[eos, 13]."""
    Rewriter.from_openai("script-bpo", base_url=server.base_url, cache_size=0).rewrite("Tell me about Harry Potter", mode="aggressive")
    body = server.received()[-1]["body"]
    assert body["stop_token_ids"] == [13] and "\n" not in body.get("stop", [])
    # A server that does not know stop_token_ids gets the newline as a stop string.
    Rewriter.from_openai("script-bpo", base_url=no_stop_ids_server.base_url, cache_size=0).rewrite("Tell me about Harry Potter", mode="aggressive")
    bodies = [r["body"] for r in no_stop_ids_server.received()]
    assert len(bodies) == 2 and "stop_token_ids" not in bodies[1] and bodies[1]["stop"] == ["\n"]


# --- English only ------------------------------------------------------------------------------

NON_ENGLISH = ["如何在Facebook上创建个人资料？", "¿Cuál es la mejor manera de aprender a programar?", "Как мне научиться программировать?"]


def test_non_english_prompts_pass_through_a_bpo_checkpoint_with_no_request(server):
    rewriter = Rewriter.from_openai("script-bpo", base_url=server.base_url, cache_size=0)
    before = len(server.received())
    results = rewriter.rewrite_batch(NON_ENGLISH, mode="aggressive")
    assert len(server.received()) == before  # not one optimizer call
    assert [r.fallback for r in results] == [FallbackReason.NON_ENGLISH] * 3
    assert [r.rewritten for r in results] == NON_ENGLISH and all(r.detail for r in results)
    assert results[0].to_dict()["fallback"] == "non_english"
    # A multilingual optimizer turns the check off; a general LLM as prompt engineer has it off already.
    Rewriter.from_openai("script-bpo", base_url=server.base_url, cache_size=0, guards=GuardConfig(english_only=False)).rewrite(NON_ENGLISH[0])
    Rewriter.from_openai("script", base_url=server.base_url, cache_size=0).rewrite(NON_ENGLISH[0])
    assert len(server.received()) == before + 2
    forced = Rewriter.from_openai("script", base_url=server.base_url, cache_size=0, guards=GuardConfig(english_only=True))
    assert forced.rewrite(NON_ENGLISH[0]).fallback is FallbackReason.NON_ENGLISH and len(server.received()) == before + 2


def test_non_english_prompts_never_reach_a_local_bpo_model(tiny_rewriter, monkeypatch):
    calls: list[int] = []
    real = tiny_rewriter.backend.model.generate
    monkeypatch.setattr(tiny_rewriter.backend.model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = tiny_rewriter.rewrite(NON_ENGLISH[0], mode="aggressive")
    assert result.fallback is FallbackReason.NON_ENGLISH and calls == []
    english = tiny_rewriter.rewrite("Translate into English: 我今天很高兴，因为我的朋友来看我了")
    assert english.fallback is not FallbackReason.NON_ENGLISH and calls == [1]  # an English instruction about Chinese text


# --- hidden state made explicit ----------------------------------------------------------------


def test_the_guard_preset_is_on_every_result(tiny_bpo_dir, tiny_rewriter):
    assert tiny_rewriter.rewrite("   ").to_dict()["guard_preset"] == "default"
    strict = Rewriter.from_pretrained(tiny_bpo_dir, guards=GuardConfig.strict(), max_new_tokens=4)
    assert strict.rewrite("   ").guard_preset == "strict"
    custom = Rewriter.from_pretrained(tiny_bpo_dir, guards=GuardConfig(english_only=False), max_new_tokens=4)
    assert custom.rewrite(NON_ENGLISH[0]).guard_preset == "custom"


def test_shared_is_the_one_process_wide_default():
    shared = Rewriter.shared()
    assert Rewriter.shared() is shared and Rewriter.default() is shared
    own = Rewriter.default(cache_size=0)
    assert own is not shared and not own.loaded  # a new instance, loaded on first use
    assert own.guard_preset == "strict"  # the bundled model's guards, recorded
