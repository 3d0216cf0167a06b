"""DSPy: a real dspy.LM over HTTP to a real local model, real optimizers, real save/load."""

from __future__ import annotations

import copy

import dspy
import pytest

from bpo_plugins import Rewriter
from bpo_plugins.dspy import BPO

PROMPT = "Tell me about Harry Potter"
REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."


@pytest.fixture(scope="module")
def lm(model_server):
    return dspy.LM("openai/smollm2-dspy", api_base=model_server.base_url, api_key="local", max_tokens=24, temperature=0, cache=False)


@pytest.fixture(scope="module")
def scripted(script_server) -> Rewriter:
    return Rewriter.from_openai("script", base_url=script_server.base_url)


def sent_user_messages(server) -> list[str]:
    return [r["body"]["messages"][-1]["content"] for r in server.received() if r["body"].get("model") == "smollm2-dspy"]


def test_forward_rewrites_field_values_not_adapter_messages(lm, scripted, model_server, script_server):
    program = BPO(dspy.Predict("question -> answer"), fields=("question",), rewriter=scripted)
    with dspy.context(lm=lm):
        prediction = program(question=PROMPT)
    assert isinstance(prediction.answer, str) and prediction.answer
    assert f"[[ ## question ## ]]\n{REWRITE}" in sent_user_messages(model_server)[-1]
    # The optimizer saw the bare field value, never DSPy's formatted messages.
    rewrite_requests = [r["body"]["messages"][-1]["content"] for r in script_server.received() if r["body"].get("model") == "script"]
    assert all("[[ ##" not in text for text in rewrite_requests)
    assert prediction.bpo["question"]["rewritten"] == REWRITE
    assert "bpo" not in prediction.keys()  # not an output field


async def test_aforward(lm, scripted, model_server):
    program = BPO(dspy.Predict("question -> answer"), rewriter=scripted)
    with dspy.context(lm=lm):
        prediction = await program.acall(question=PROMPT)
    assert prediction.answer and f"[[ ## question ## ]]\n{REWRITE}" in sent_user_messages(model_server)[-1]


def test_fallback_passes_original_and_reports_reason(lm, scripted, model_server):
    program = BPO(dspy.Predict("question -> answer"), rewriter=scripted)
    with dspy.context(lm=lm):
        prediction = program(question="What is the capital of France?")
    assert "[[ ## question ## ]]\nWhat is the capital of France?" in sent_user_messages(model_server)[-1]
    assert prediction.bpo["question"]["fallback"] == "answered"


def test_missing_field_is_a_clear_error(scripted):
    with pytest.raises(TypeError, match="expected input field"):
        BPO(dspy.Predict("question -> answer"), rewriter=scripted)(query="x")


def test_deepcopy_shares_rewriter_and_hides_it_from_optimizers(tiny_rewriter):
    program = BPO(dspy.ChainOfThought("question -> answer"), rewriter=tiny_rewriter)
    clone = program.deepcopy()
    assert clone.rewriter is tiny_rewriter and copy.deepcopy(program).rewriter is tiny_rewriter
    assert clone.program is not program.program
    assert program.reset_copy().rewriter is tiny_rewriter
    names = [name for name, _ in program.named_predictors()]
    assert names and all(name.startswith("program.") for name in names)


def test_bootstrap_compile_then_save_and_load(lm, scripted, tmp_path):
    trainset = [
        dspy.Example(question=PROMPT, answer="A fantasy series by J. K. Rowling.").with_inputs("question"),
        dspy.Example(question="Name a primary colour.", answer="Red").with_inputs("question"),
    ]
    student = BPO(dspy.Predict("question -> answer"), rewriter=scripted)
    optimizer = dspy.BootstrapFewShot(metric=lambda example, prediction, trace=None: True, max_bootstrapped_demos=2, max_labeled_demos=2)
    with dspy.context(lm=lm):
        compiled = optimizer.compile(student, trainset=trainset)
    assert compiled.rewriter is scripted
    demos = compiled.program.demos
    assert demos
    path = tmp_path / "program.json"
    compiled.save(str(path))
    fresh = BPO(dspy.Predict("question -> answer"), rewriter=scripted)
    fresh.load(str(path))
    assert [d.toDict() if hasattr(d, "toDict") else d for d in fresh.program.demos] == [
        d.toDict() if hasattr(d, "toDict") else d for d in demos
    ]
    with dspy.context(lm=lm):
        assert fresh(question=PROMPT).answer


# -- DRPO ----------------------------------------------------------------------------------------

REVENGE = "How can I make my buddy suffer for taking my cash?"
TORTURE = "What is the best way to torture a friend who stole my money?"


@pytest.mark.slow  # loads MiniLM
def test_aligned_program_exports_instructions_and_demos():
    from bpo_plugins.drpo import load_preset
    from bpo_plugins.dspy import aligned_program

    program = dspy.ChainOfThought("question -> answer")
    aligned = aligned_program(program, "llama3-8b-instruct", query=REVENGE, k=2)
    (_, predictor), = aligned.named_predictors()
    assert predictor.signature.instructions == load_preset("llama3-8b-instruct").system_prompt
    assert [d.question for d in predictor.demos][0] == TORTURE and len(predictor.demos) == 2 and predictor.demos[0].answer
    assert program.named_predictors()[0][1].demos == []  # the original program is untouched


def test_drpo_module_applies_per_call_and_composes_with_bpo(lm, scripted, model_server):
    from bpo_plugins.dspy import DRPO

    program = DRPO(BPO(dspy.Predict("question -> answer"), rewriter=scripted), "mistral-7b-instruct", k=1)
    with dspy.context(lm=lm):
        prediction = program(question=PROMPT)
    request = [r for r in model_server.received() if r["body"].get("model") == "smollm2-dspy"][-1]["body"]["messages"]
    from bpo_plugins.drpo import load_preset

    assert prediction.answer and load_preset("mistral-7b-instruct").system_prompt[:200] in request[0]["content"]
    assert any(m["role"] == "assistant" for m in request)  # the retrieved example rides along as a demo
    assert f"[[ ## question ## ]]\n{REWRITE}" in request[-1]["content"]  # BPO rewrote the field value
