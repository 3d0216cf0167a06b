"""DSPy: a real dspy.LM over HTTP to a real local model, real optimizers, real save/load."""

from __future__ import annotations

import copy

import pytest

dspy = pytest.importorskip("dspy")

from bpo_plugins import Rewriter  # noqa: E402
from bpo_plugins.dspy import BPO  # noqa: E402

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
