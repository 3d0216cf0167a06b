"""The Rewriter end to end: real models, real HTTP, every guard on the inline path."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from bpo_plugins import FallbackReason, RewriteError, Rewriter
from bpo_plugins.templates import BPO, PROMPT_ENGINEER
from tests.conftest import prefix_reuse_runs, ticks_during

# --- the bundled optimizer --------------------------------------------------------------------


def test_default_rewriter_runs_offline_and_is_safe(bundled_rewriter):
    result = bundled_rewriter.rewrite("Tell me about Harry Potter")
    # The default runtime (built on first use): GenAI int8, else optimum int8.
    from bpo_plugins.backends.runtime import default_runtime

    assert result.backend == ("onnx-genai" if default_runtime() == ("genai", "int8") else "onnx")
    assert result.model == "bpo-small"
    assert result.original == "Tell me about Harry Potter"
    assert result.candidates, "the model's raw output is kept for inspection"
    assert result.fallback is None or not result.fallback.transient, result.detail  # the model ran: no backend error
    if result.fallback is None:
        assert result.rewritten != result.original
    else:
        # The untuned base answers instead of rewriting: the guard passes the original on.
        assert result.rewritten == result.original and result.detail


def test_all_modes_on_bundled_model(bundled_rewriter):
    for mode in ("greedy", "stable", "aggressive"):
        result = bundled_rewriter.rewrite("Write a short poem about the sea.", mode=mode)
        assert result.mode == mode
        # The model ran and wrote something: a backend error or time-out would also pass the prompt on.
        assert result.candidates and (result.fallback is None or not result.fallback.transient), result.detail
        assert isinstance(result.rewritten, str) and result.rewritten
    aggressive = bundled_rewriter.rewrite("Write a short poem about the sea.", mode="aggressive")
    assert len(aggressive.candidates) == bundled_rewriter.num_candidates


def test_greedy_is_deterministic_and_cached(bundled_rewriter):
    prompt = "Give me three tips for learning Spanish."
    first = bundled_rewriter.rewrite(prompt)
    second = bundled_rewriter.rewrite(prompt)
    assert not first.cached and second.cached
    assert (second.rewritten, second.fallback, second.candidates) == (first.rewritten, first.fallback, first.candidates)
    stable = bundled_rewriter.rewrite(prompt, mode="stable")
    assert not stable.cached  # sampling modes are never cached


async def test_async_api_matches_sync(bundled_rewriter):
    prompts = ["Explain recursion to a child.", "Plan a weekend in Rome."]
    sync = bundled_rewriter.rewrite_batch(prompts, mode="greedy")
    single = await bundled_rewriter.arewrite(prompts[0])
    batch = await bundled_rewriter.arewrite_batch(prompts)
    assert single.rewritten == sync[0].rewritten
    assert [r.rewritten for r in batch] == [r.rewritten for r in sync]


# --- batching, cache, limits (tiny local Llama) -----------------------------------------------


def count_generate_calls(rewriter: Rewriter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the real model.generate: record batch sizes, keep the real computation."""
    model = rewriter.backend.model
    real = model.generate
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_rewrite_batch_is_one_padded_generate_call(tiny_rewriter, monkeypatch):
    calls = count_generate_calls(tiny_rewriter, monkeypatch)
    prompts = [f"Unique prompt number {i} about {'topic ' * i}" for i in range(6)]
    results = tiny_rewriter.rewrite_batch(prompts, mode="stable")
    assert calls == [6]
    assert [r.original for r in results] == prompts


def test_aggressive_candidates_in_one_call(tiny_rewriter, monkeypatch):
    calls = count_generate_calls(tiny_rewriter, monkeypatch)
    results = tiny_rewriter.rewrite_batch(["First question here?", "Second one, please."], mode="aggressive")
    assert calls == [2]  # 2 prompts x 5 candidates from one generate call (num_return_sequences)
    assert all(len(r.candidates) == 5 for r in results)


def test_cache_hits_skip_generation(tiny_bpo_dir, monkeypatch):
    rewriter = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=6)
    calls = count_generate_calls(rewriter, monkeypatch)
    rewriter.rewrite_batch(["alpha prompt", "beta prompt"])
    results = rewriter.rewrite_batch(["alpha prompt", "gamma prompt", "beta prompt"])
    assert calls == [2, 1]
    assert [r.cached for r in results] == [True, False, True]


def test_sqlite_cache_survives_a_new_rewriter(tiny_bpo_dir, tmp_path, monkeypatch):
    path = tmp_path / "rewrites.sqlite"
    first = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=6, cache_path=path).rewrite("persist me")
    second_rewriter = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=6, cache_path=path)
    calls = count_generate_calls(second_rewriter, monkeypatch)
    second = second_rewriter.rewrite("persist me")
    assert calls == [] and second.cached
    assert (second.rewritten, second.fallback) == (first.rewritten, first.fallback)


def test_cache_key_separates_models_and_templates(tiny_bpo_dir, tmp_path, monkeypatch):
    import shutil

    path = tmp_path / "shared.sqlite"
    Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=6, cache_path=path).rewrite("shared prompt")
    retrained = tmp_path / "BPO-tiny-v2"
    shutil.copytree(tiny_bpo_dir, retrained)
    (retrained / "model.safetensors").touch()  # new weights on disk: a new revision
    others = [
        Rewriter.from_pretrained(retrained, max_new_tokens=6, cache_path=path),
        Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=6, cache_path=path, template="Fix: {prompt}"),
    ]
    for other in others:
        calls = count_generate_calls(other, monkeypatch)
        assert not other.rewrite("shared prompt").cached and calls == [1]


def test_long_input_passes_through_untouched(tiny_rewriter, monkeypatch):
    calls = count_generate_calls(tiny_rewriter, monkeypatch)
    long_prompt = "Summarise this. " + "word " * 600
    result = tiny_rewriter.rewrite(long_prompt)
    assert calls == [] and result.rewritten == long_prompt
    assert result.fallback is FallbackReason.INPUT_TOO_LONG


def test_max_new_tokens_caps_generation(tiny_bpo_dir):
    result = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=3).rewrite("Describe the moon and its phases.")
    assert 0 < result.output_tokens <= 3


def test_timeout_falls_back(tiny_bpo_dir):
    # No loop stop: the random tiny model loops at once, and a cut loop can end well inside 0.05 s.
    rewriter = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=4000, max_input_words=5000, timeout_s=0.05, stop_loops=False)
    result = rewriter.rewrite("Describe " + "the moon " * 300)
    assert result.fallback is FallbackReason.TIMEOUT and result.rewritten == result.original
    with pytest.raises(RewriteError, match="timeout"):
        rewriter.rewrite("Describe " + "the sun " * 300, strict=True)


def test_empty_input_passes_through(tiny_rewriter):
    result = tiny_rewriter.rewrite("   ")
    assert result.fallback is FallbackReason.EMPTY_INPUT and result.rewritten == "   "


@pytest.mark.parametrize("bad", [b"bytes", 3, None, ["list"]])
def test_bad_input_raises_type_error(tiny_rewriter, bad):
    with pytest.raises(TypeError, match="must be str"):
        tiny_rewriter.rewrite(bad)


def test_bad_arguments_raise_value_errors(tiny_rewriter):
    with pytest.raises(ValueError, match="unknown mode"):
        tiny_rewriter.rewrite("x", mode="wild")
    with pytest.raises(TypeError, match="list of prompts"):
        tiny_rewriter.rewrite_batch("one string")
    with pytest.raises(ValueError, match="one entry"):
        tiny_rewriter.rewrite_batch(["a", "b"], contexts=["only one"])
    with pytest.raises(ValueError, match="timeout_s"):
        Rewriter(tiny_rewriter.backend, timeout_s=0)


def test_context_is_never_sent_and_comes_back_verbatim(tiny_rewriter, monkeypatch):
    seen: list[str] = []
    real = tiny_rewriter.backend.render
    monkeypatch.setattr(tiny_rewriter.backend, "render", lambda p, t: seen.append(p) or real(p, t))
    context = "Vancouver Whitecaps FC is owned by four investors.\n\n  Kerfoot has been majority owner since 2002.  "
    result = tiny_rewriter.rewrite("Who owns the club?", context=context, mode="stable")
    assert seen == ["Who owns the club?"]
    assert result.context == context and result.prompt.endswith(context)


# --- guards through a real HTTP backend ---------------------------------------------------------


@pytest.fixture
def scripted(script_server):
    return Rewriter.from_openai("script", base_url=script_server.base_url, cache_size=0)


def test_good_rewrite_is_used(scripted):
    result = scripted.rewrite("Tell me about Harry Potter")
    assert result.fallback is None and result.backend == "openai"
    assert result.rewritten.startswith("Provide an overview of the Harry Potter book series")


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("What is the capital of France?", FallbackReason.ANSWERED),
        ("Please loop forever on this topic of words", FallbackReason.DEGENERATE),
        ("Please say nothing useful", FallbackReason.EMPTY_OUTPUT),
        ("Describe this way too long request", FallbackReason.LENGTH_RATIO),
        ("crash please", FallbackReason.BACKEND_ERROR),
    ],
)
def test_guards_fail_open_and_strict_raises(scripted, prompt, reason):
    result = scripted.rewrite(prompt)
    assert result.fallback is reason and result.rewritten == prompt and result.detail
    with pytest.raises(RewriteError) as info:
        scripted.rewrite(prompt, strict=True)
    assert info.value.reason is reason


def test_length_budget_caps_max_tokens_and_switches_off(script_server):
    # Our guard: ~9 tokens a prompt word + 16 (max_length_ratio 6 x 1.5), within max_new_tokens; off,
    # the whole max_new_tokens, as the reference decodes with a fixed max_new_tokens.
    prompt = "Tell me about Harry Potter"
    sent = {}
    for on in (True, False):
        mark = len(script_server.received())
        rewriter = Rewriter.from_openai("script", base_url=script_server.base_url, cache_size=0, max_new_tokens=300, length_budget=on)
        assert rewriter.rewrite(prompt).fallback is None and rewriter.with_options().length_budget is on
        (body,) = [r["body"] for r in script_server.received()[mark:]]
        sent[on] = body["max_tokens"]
    assert sent == {True: 5 * 9 + 16, False: 300}


def test_protected_span_restored_or_fallback(scripted):
    options = "A) Paris\nB) Lyon\n   C) Nice"
    kept = scripted.rewrite(f"keep options: which city is the capital? <keep>{options}</keep>")
    assert kept.fallback is None and kept.rewritten.endswith(options)
    lost = scripted.rewrite(f"lose options: which city is the capital? <keep>{options}</keep>")
    assert lost.fallback is FallbackReason.PROTECTED_SPAN_LOST
    assert lost.rewritten == f"lose options: which city is the capital? {options}"


def test_http_timeout_falls_back(script_server):
    rewriter = Rewriter.from_openai("script", base_url=script_server.base_url, timeout_s=0.5, cache_size=0)
    result = rewriter.rewrite("slow please, describe it")
    assert result.fallback in (FallbackReason.TIMEOUT, FallbackReason.BACKEND_ERROR)
    assert "Timeout" in (result.detail or "") and result.rewritten == "slow please, describe it"


async def test_async_http_batch(scripted):
    results = await scripted.arewrite_batch(["Tell me about Harry Potter", "What is the capital of France?"])
    assert [r.fallback for r in results] == [None, FallbackReason.ANSWERED]


def test_unreachable_server_fails_open():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    rewriter = Rewriter.from_openai("bpo", base_url=f"http://127.0.0.1:{port}/v1")
    result = rewriter.rewrite("Tell me a joke")
    assert result.fallback is FallbackReason.BACKEND_ERROR and result.rewritten == "Tell me a joke"


def test_anthropic_backend_over_http(script_server):
    rewriter = Rewriter.from_anthropic("script-claude", api_key="test", base_url=script_server.url, cache_size=0)
    result = rewriter.rewrite("Tell me about Harry Potter")
    assert result.fallback is None and result.backend == "anthropic"
    request = [r for r in script_server.received() if r["path"].endswith("/messages")][-1]["body"]
    assert request["system"] == PROMPT_ENGINEER.system  # Claude acts as the paper's LLM prompt engineer
    assert "Tell me about Harry Potter" in request["messages"][0]["content"]
    aggressive = rewriter.rewrite("Tell me about Harry Potter", mode="aggressive")
    assert len(aggressive.candidates) == 5


def test_openai_backend_against_real_local_model(model_server):
    rewriter = Rewriter.from_openai("smollm2", base_url=model_server.base_url, max_new_tokens=24)
    result = rewriter.rewrite("Tell me about Harry Potter")
    assert result.candidates and result.candidates[0]  # the real model produced text over HTTP
    assert result.rewritten == result.original if result.fallback else result.rewritten != result.original


def test_bpo_checkpoint_on_a_server_gets_the_raw_inst_template_through_completions(model_server):
    """vLLM or SGLang serving THUDM/BPO: the exact [INST] format on /v1/completions, not a chat template."""
    rewriter = Rewriter.from_openai("THUDM/BPO", base_url=model_server.base_url, max_new_tokens=16, cache_size=0)
    assert rewriter.template is BPO
    result = rewriter.rewrite("Tell me about Harry Potter")
    sent = model_server.received()[-1]
    assert sent["path"] == "/v1/completions" and "messages" not in sent["body"]
    assert sent["body"]["prompt"] == BPO.render_raw("Tell me about Harry Potter") and sent["body"]["max_tokens"] == 16
    assert result.candidates and result.candidates[0]  # the real model completed the raw prompt
    chat = Rewriter.from_openai("smollm2", base_url=model_server.base_url, max_new_tokens=8, cache_size=0)
    chat.rewrite("Tell me about Harry Potter")
    assert model_server.received()[-1]["path"] == "/v1/chat/completions"  # other models keep the chat endpoint


# --- THUDM/BPO path ----------------------------------------------------------------------------


def test_bpo_checkpoint_gets_the_exact_inst_template(tiny_bpo_dir, tiny_rewriter):
    assert tiny_rewriter.template is BPO
    backend = tiny_rewriter.backend
    assert backend.model.config.model_type == "llama"
    rendered = backend.render("Tell me about Harry Potter", tiny_rewriter.template)
    assert rendered == (
        "[INST] You are an expert prompt engineer. Please help me improve this prompt to get a more "
        "helpful and harmless response:\nTell me about Harry Potter [/INST]"
    )
    ids = backend.tokenizer(rendered, add_special_tokens=True)["input_ids"]
    assert backend.tokenizer.decode(ids, skip_special_tokens=True) == rendered
    assert tiny_rewriter.rewrite("Tell me about Harry Potter").candidates  # it generates


def test_template_is_overridable(tiny_bpo_dir):
    rewriter = Rewriter.from_pretrained(tiny_bpo_dir, template="Make this clearer: {prompt}", max_new_tokens=4)
    assert rewriter.template.user_text("hi") == "Make this clearer: hi"
    with pytest.raises(ValueError, match="unknown template"):
        Rewriter.from_pretrained(tiny_bpo_dir, template="no slot").template  # noqa: B018


@pytest.mark.slow  # imports torch and transformers to try the load
def test_missing_model_gives_clear_error(tmp_path):
    from bpo_plugins import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load optimizer model"):
        Rewriter.from_pretrained(tmp_path / "nothing-here").warmup()


def test_import_is_lazy():
    code = (
        "import sys, bpo_plugins; from bpo_plugins import Rewriter; Rewriter.default();"
        "heavy = [m for m in ('torch', 'transformers', 'langchain_core', 'llama_index', 'dspy', 'openai', 'anthropic')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rewriter_is_thread_safe_under_concurrent_calls(tiny_rewriter):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Concurrent question {i}?" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: tiny_rewriter.rewrite(p, mode="stable"), prompts))
    assert [r.original for r in results] == prompts
    # A shared tokenizer used from two threads raises ("Already borrowed"), which fails open as a backend error.
    assert all(r.candidates and (r.fallback is None or not r.fallback.transient) for r in results), [r.detail for r in results]


async def test_async_does_not_block_event_loop(tiny_bpo_dir):
    rewriter = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=64).warmup()
    batch = rewriter.arewrite_batch([f"Explain topic {i} in depth" for i in range(8)], mode="stable")
    results, ticks, elapsed = await ticks_during(batch, interval=0.005)
    assert all(r.candidates for r in results)  # the model generated: the batch was real work
    # The loop kept ticking while the batch ran (a blocked loop ticks about once).
    assert ticks >= max(2, 0.25 * elapsed / 0.005), (ticks, elapsed)


def test_prompt_lookup_decoding_matches_plain_greedy(tiny_bpo_dir):
    with_lookup = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=24, cache_size=0)
    plain = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=24, cache_size=0)
    plain.backend.prompt_lookup_tokens = None
    assert with_lookup.backend.prompt_lookup_tokens
    for prompt in ["Repeat this sentence about the moon and the moon again", "Tell me about Harry Potter and Harry's friends"]:
        assert with_lookup.rewrite(prompt).candidates == plain.rewrite(prompt).candidates


LOOPING_PROMPT = "write a poem about the sea and the wind"  # the seeded tiny model falls into a loop here


def test_a_loop_is_stopped_while_decoding_and_cut_to_one_copy(tiny_bpo_dir):
    from bpo_plugins.decoding import Decoding

    rewriter = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=96, cache_size=0)
    result = rewriter.rewrite(LOOPING_PROMPT)
    free = rewriter.backend.generate([LOOPING_PROMPT], rewriter.template, Decoding(max_new_tokens=96, stop_loops=False), None)
    free_text, free_tokens = free.generations[0].texts[0], free.generations[0].output_tokens
    stopped = result.candidates[0]
    assert result.loops_cut == 1 and free.generations[0].loops_cut == 0
    assert result.output_tokens < free_tokens == 96  # stopped early, not at the token budget
    tail = stopped[-40:]
    assert free_text.startswith(stopped.rstrip()) and free_text.count(tail) >= 3 and stopped.count(tail) == 1
    assert result.to_dict()["loops_cut"] == 1


def test_default_runtime_reuses_the_template_prefix_with_identical_greedy_rewrites(bundled_rewriter):
    from bpo_plugins.decoding import Decoding

    backend = bundled_rewriter.backend
    prompts = ["Tell me about Harry Potter", "How can I improve my time management skills?", "Write a haiku about autumn"]
    warm, cold = prefix_reuse_runs(backend, bundled_rewriter.template, prompts, Decoding(max_new_tokens=48, stop_loops=True))
    assert warm == cold and all(texts[0].strip() for texts in warm)


def test_prompt_lookup_never_drafts_past_the_token_budget(bundled_rewriter):
    """A cold generator has room for the prompt plus max_new_tokens: drafts near the end must fit."""
    from bpo_plugins.decoding import Decoding

    backend, template = bundled_rewriter.backend, bundled_rewriter.template
    prompt = "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat"
    backend.reuse_prefix = False
    try:
        for budget in range(1, 24):
            assert backend.generate([prompt], template, Decoding(max_new_tokens=budget), None).generations[0].output_tokens <= budget
    finally:
        backend.reuse_prefix = True
