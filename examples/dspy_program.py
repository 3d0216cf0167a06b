"""BPO composed with a DSPy program: field values are rewritten before the program runs.

    python examples/dspy_program.py ["your question"]
"""

from __future__ import annotations

import logging
import os
import sys

import dspy
from _target import local_base_url, provider, show

from bpo_plugins.dspy import BPO


def target_lm() -> dspy.LM:
    if provider() == "openai":
        return dspy.LM("openai/gpt-4o-mini")
    if provider() == "anthropic":
        return dspy.LM("anthropic/claude-haiku-4-5")
    # Offline: DSPy reads its bundled model map instead of trying the network, and the answer is capped
    # at 64 tokens on purpose (a 135M model; quick to run), so its "truncated" warning says nothing new.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    return dspy.LM("openai/local", api_base=local_base_url(), api_key="local", max_tokens=64, temperature=0, cache=False)


class PlainAdapter(dspy.Adapter):
    """For the 135M offline model, which cannot follow DSPy's ``[[ ## field ## ]]`` chat format: the one
    input field's value is the user's message and the whole reply is the one output field. An API
    target gets DSPy's own ChatAdapter."""

    def format(self, signature, demos, inputs):
        (name,) = signature.input_fields
        return [{"role": "user", "content": str(inputs[name])}]

    def parse(self, signature, completion):
        (name,) = signature.output_fields
        return {name: completion.strip()}


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Tell me about Harry Potter"
    adapter = PlainAdapter() if provider() == "local" else dspy.ChatAdapter()
    dspy.configure(lm=target_lm(), adapter=adapter)
    program = BPO(dspy.Predict("question -> answer"), fields=("question",))
    prediction = program(question=question)
    rewrite = prediction.bpo["question"]
    show(rewrite["original"], rewrite["rewritten"], rewrite["fallback"], prediction.answer)


if __name__ == "__main__":
    main()
