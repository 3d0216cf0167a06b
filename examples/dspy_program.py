"""BPO composed with a DSPy program: field values are rewritten before the program runs.

    python examples/dspy_program.py ["your question"]
"""

from __future__ import annotations

import sys

import dspy
from _target import local_base_url, provider, show

from bpo_plugins.dspy import BPO


def target_lm() -> dspy.LM:
    if provider() == "openai":
        return dspy.LM("openai/gpt-4o-mini")
    if provider() == "anthropic":
        return dspy.LM("anthropic/claude-haiku-4-5")
    return dspy.LM("openai/local", api_base=local_base_url(), api_key="local", max_tokens=64, temperature=0, cache=False)


class LenientChatAdapter(dspy.ChatAdapter):
    """The 135M offline model ignores DSPy's ``[[ ## field ## ]]`` markers: read its whole reply as the one output field."""

    def parse(self, signature, completion):
        try:
            return super().parse(signature, completion)
        except Exception:
            (name,) = signature.output_fields
            return {name: completion.strip()}


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Tell me about Harry Potter"
    adapter = LenientChatAdapter() if provider() == "local" else dspy.ChatAdapter()
    dspy.configure(lm=target_lm(), adapter=adapter)
    program = BPO(dspy.Predict("question -> answer"), fields=("question",))
    prediction = program(question=question)
    rewrite = prediction.bpo["question"]
    show(rewrite["original"], rewrite["rewritten"], rewrite["fallback"], prediction.answer)


if __name__ == "__main__":
    main()
